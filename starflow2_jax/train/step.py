"""The train step: one `jax.jit` with explicit shardings and donation.

  train_step(state, frozen, batch, rng) -> (state, metrics)            [(state, metrics, grads) for tests]

Inside: per-step RNG `fold_in(rng, state.step)`, gradient accumulation as a `lax.scan` over micro-batches,
the optax chain (stage masks, clipping, AdamW), an optional parameter EMA, and the non-finite guard (the
update is skipped, i.e. parameters, optimizer state and EMA stay bit-identical, and counted).

Losses are (sum, count) pairs, so that means stay exact under any mesh and any `grad_accum`.
`loss_fn(params, frozen, batch, rng) -> {term: (sum, count)}` (float scalars):
  - `sum` is the term's total over the micro-batch's examples (or supervised tokens), `count` how many
    there are (it may depend on the batch, e.g. on a token mask, never on the parameters);
  - `objective` {term: weight} says which terms the optimizer minimises:
      loss = sum_t weight_t * (sum over the global batch of sum_t) / (sum over the global batch of count_t)
    so a token mean is a mean over every supervised token of the global batch, however the batch is
    split into micro-batches and over devices (REFERENCE-BEHAVIOURS 45, 48);
  - every term is logged as its global ratio sum / count, next to `loss` (the objective);
  - `batch["pos"]` (int32 [b]) is each example's position in the global batch: draw per-example
    randomness from `(rng, pos)` so that the loss does not depend on the mesh or on the micro-batching.
With grad_accum = k > 1 the global counts are taken first from `loss_fn` on the whole batch with its sums
unused (XLA removes the computation that only feeds them); each micro-batch's gradient is then that of
sum_t weight_t * sum_t(micro-batch) / count_t(global), and the k gradients add up to the exact gradient.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from starflow2_jax import parallel
from starflow2_jax.errors import UserError
from starflow2_jax.train.state import TrainState

Terms = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[[Any, Any, dict, jax.Array], Terms]
RESERVED = ("loss", "grad_norm", "lr", "finite", "skipped")  # metrics the step adds itself


def _split_micro(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ... (strided, so that each
  device's contiguous rows contribute equally to every micro-batch and no data moves)."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)


def _check_terms(terms: Terms, objective: Mapping[str, float]) -> None:
  clash = sorted(set(terms) & set(RESERVED))
  missing = sorted(set(objective) - set(terms))
  if clash or missing or not objective:
    raise UserError(f"loss terms {sorted(terms)} with objective {dict(objective)}: the objective must "
                    f"name terms of the loss (missing: {missing}) and no term may be called one of "
                    f"{RESERVED} (found: {clash})")


def _weighted(terms: Terms, counts: Mapping[str, jax.Array], objective: Mapping[str, float]):
  return sum(float(w) * terms[t][0] / counts[t] for t, w in objective.items())


def make_grads_fn(loss_fn: LossFn, objective: Mapping[str, float], grad_accum: int,
                  mesh: jax.sharding.Mesh, trainable: Any = None):
  """grads_fn(params, frozen, batch, rng) -> (loss, metrics {term: sum / count}, grads like params).

  `trainable`: a tree of bools like `params` (None: all); only those leaves are differentiated, the
  others get zero gradients without any backward work. Accumulators keep the loss's dtype."""
  k = int(grad_accum)
  if k < 1:
    raise UserError(f"train.grad_accum must be >= 1, found {k}")
  micro_sh = NamedSharding(mesh, P(None, parallel.BATCH_AXES))

  def grads_fn(params, frozen, batch, rng):
    leaves, treedef = jax.tree.flatten(params)
    mask = [True] * len(leaves) if trainable is None else jax.tree.leaves(trainable)
    idx = [i for i, m in enumerate(mask) if m]

    def objective_and_terms(train_leaves, mb, counts):
      full = list(leaves)
      for j, i in enumerate(idx):
        full[i] = train_leaves[j]
      terms = loss_fn(jax.tree.unflatten(treedef, full), frozen, mb, rng)
      _check_terms(terms, objective)
      counts = {t: c for t, (_, c) in terms.items()} if counts is None else counts
      return _weighted(terms, counts, objective), terms

    grad_fn = jax.value_and_grad(objective_and_terms, has_aux=True)
    train_leaves = [leaves[i] for i in idx]
    if k == 1:
      (loss, terms), g = grad_fn(train_leaves, batch, None)
      sums = {t: s for t, (s, _) in terms.items()}
      counts = {t: c for t, (_, c) in terms.items()}
    else:
      counts = {t: c for t, (_, c) in loss_fn(params, frozen, batch, rng).items()}
      micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(_split_micro(x, k), micro_sh),
                           batch)

      def body(carry, mb):
        g_acc, l_acc, s_acc = carry
        (loss, terms), g = grad_fn(train_leaves, mb, counts)
        s_acc = {t: s_acc[t] + terms[t][0] for t in s_acc}
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, s_acc), None

      zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
      mb0 = jax.tree.map(lambda x: x[0], micro)
      l_shape, t_shape = jax.eval_shape(lambda tl, mb: objective_and_terms(tl, mb, counts),
                                        train_leaves, mb0)
      init = (zeros(train_leaves), zeros(l_shape), {t: zeros(s) for t, (s, _) in t_shape.items()})
      (g, loss, sums), _ = jax.lax.scan(body, init, micro)
    grads = [jnp.zeros_like(x) for x in leaves]
    for j, i in enumerate(idx):
      grads[i] = g[j]
    metrics = {t: sums[t] / counts[t] for t in sums}
    return loss, metrics, jax.tree.unflatten(treedef, grads)

  return grads_fn


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, train: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh, rules, state_sh: TrainState, frozen_sh: Any, *,
                    objective: Mapping[str, float], trainable: Any = None, return_grads: bool = False):
  """The jitted step. `state` is donated; `frozen` is neither differentiated nor donated.

  objective: {term: weight} (see the module docstring); trainable: bools like the params (None: all;
  `optimizer.trainable_mask`); return_grads: also return the gradients (sharded like the params)."""
  ema_decay = float(train.ema_decay)
  rep = parallel.replicated(mesh)
  grads_fn = make_grads_fn(loss_fn, objective, int(train.grad_accum), mesh, trainable)

  def step_fn(state: TrainState, frozen, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    b = jax.tree.leaves(batch)[0].shape[0]
    batch = dict(batch, pos=jax.lax.with_sharding_constraint(jnp.arange(b, dtype=jnp.int32),
                                                           parallel.batch_sharding(mesh)))
    frozen = jax.lax.stop_gradient(frozen)
    loss, metrics, grads = grads_fn(state.params, frozen, batch, rng)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    grad_norm = optax.tree.norm(grads)
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
    return (new_state, out, grads) if return_grads else (new_state, out)

  out_sh = (state_sh, rep, state_sh.params) if return_grads else (state_sh, rep)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, parallel.batch_sharding(mesh), rep),
                   out_shardings=out_sh, donate_argnums=(0,))

  def train_step(state, frozen, batch, rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, frozen, batch, rng)

  def lower(state, frozen, batch, rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted.lower(state, frozen, batch, rng)

  train_step.lower = lower
  return train_step
