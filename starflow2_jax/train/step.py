"""The train step: one `jax.jit` with explicit shardings and donation.

  train_step(state, frozen, batch, rng) -> (state, metrics)

Inside: per-step RNG `fold_in(rng, state.step)`, gradient accumulation as a `lax.scan` over micro-batches,
global-norm clipping and AdamW (the optax chain), an optional parameter EMA, and the non-finite guard
(the update is skipped, i.e. parameters, optimizer state and EMA stay bit-identical, and counted).

The step is generic over `loss_fn(params, frozen, batch, rng) -> (loss, metrics)`:
  - `loss` is a float32 scalar, the mean over the micro-batch's examples;
  - `metrics` a dict of float32 scalars that are micro-batch means (averaged over micro-batches here);
  - `batch["pos"]` (int32 [b]) is each example's position in the global batch: draw per-example
    randomness from `(rng, pos)` so that the loss does not depend on the mesh or on the micro-batching.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from starflow2_jax import parallel
from starflow2_jax.train.state import TrainState

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def _split_micro(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ... (strided, so that each
  device's contiguous rows contribute equally to every micro-batch and no data moves)."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, train: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh, rules, state_sh: TrainState, frozen_sh: Any):
  """The jitted step. `state` is donated; `frozen` is neither differentiated nor donated."""
  k = int(train.grad_accum)
  ema_decay = float(train.ema_decay)
  if k < 1:
    raise ValueError(f"train.grad_accum must be >= 1, found {k}")
  rep = parallel.replicated(mesh)
  micro_sh = NamedSharding(mesh, P(None, parallel.BATCH_AXES))

  def grads_and_metrics(params, frozen, batch, rng):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
      (loss, metrics), grads = grad_fn(params, frozen, batch, rng)
      return loss, metrics, grads
    micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(_split_micro(x, k), micro_sh), batch)

    def body(carry, mb):
      g_acc, l_acc, m_acc = carry
      (loss, metrics), grads = grad_fn(params, frozen, mb, rng)
      add = lambda a, b: a + b.astype(jnp.float32)  # noqa: E731
      return (jax.tree.map(add, g_acc, grads), l_acc + loss, jax.tree.map(add, m_acc, metrics)), None

    mb0 = jax.tree.map(lambda x: x[0], micro)
    _, m_shape = jax.eval_shape(loss_fn, params, frozen, mb0, rng)
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)  # noqa: E731
    init = (zeros(params), jnp.zeros((), jnp.float32), zeros(m_shape))
    (grads, loss, metrics), _ = jax.lax.scan(body, init, micro)
    scale = lambda t: jax.tree.map(lambda v: v / k, t)  # noqa: E731
    return loss / k, scale(metrics), scale(grads)

  def step_fn(state: TrainState, frozen, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    b = jax.tree.leaves(batch)[0].shape[0]
    batch = dict(batch, pos=jax.lax.with_sharding_constraint(jnp.arange(b, dtype=jnp.int32),
                                                           parallel.batch_sharding(mesh)))
    frozen = jax.lax.stop_gradient(frozen)
    loss, metrics, grads = grads_and_metrics(state.params, frozen, batch, rng)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state),
                           ema_params=None if ema is None else keep(ema, state.ema_params),
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    out = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr_schedule(state.step),
               finite=finite.astype(jnp.int32), skipped=new_state.skipped)
    return new_state, out

  jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, parallel.batch_sharding(mesh), rep),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))

  def train_step(state, frozen, batch, rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, frozen, batch, rng)

  def lower(state, frozen, batch, rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted.lower(state, frozen, batch, rng)

  train_step.lower = lower
  return train_step
