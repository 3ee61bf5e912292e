"""The train state and parameters that are born sharded.

`TrainState` holds what the optimizer changes; the frozen subtree (e.g. a pretrained VLM) is NOT part
of it: it is passed to the step as a separate, never differentiated, never donated argument.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from starflow2_jax import parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], optimizer steps taken (skipped non-finite steps included)
  params: Any  # trainable parameters, float32
  opt_state: Any
  ema_params: Any  # EMA of params, or None when train.ema_decay == 0
  skipped: jax.Array  # int32 [], number of non-finite steps whose update was skipped


def state_shardings(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                    rng: jax.Array, mesh: jax.sharding.Mesh, rules, use_ema: bool) -> TrainState:
  """The TrainState's shardings, from abstract shapes only (`jax.eval_shape`: nothing is allocated).

  `init_fn(rng)` returns the (logically boxed) trainable parameter tree; its logical specs map to mesh
  shardings through `rules`. Optimizer moments follow their parameters; scalars are replicated.
  """
  abstract = jax.eval_shape(init_fn, rng)
  param_sh = parallel.logical_to_shardings(abstract, mesh, rules)
  rep = parallel.replicated(mesh)
  # optax states hold parameter-shaped trees (moments, matched by path suffix) and scalars (counts)
  param_paths = [(tuple(p), sh) for p, sh in jax.tree_util.tree_flatten_with_path(param_sh)[0]]

  def opt_leaf_sharding(path, leaf):
    for p_path, sh in param_paths:
      if leaf.ndim and path[-len(p_path):] == p_path:
        return sh
    return rep

  opt_abstract = jax.eval_shape(tx.init, nn.unbox(abstract))
  return TrainState(step=rep, params=param_sh,
                    opt_state=jax.tree_util.tree_map_with_path(opt_leaf_sharding, opt_abstract),
                    ema_params=param_sh if use_ema else None, skipped=rep)


def _init_state(init_fn, tx, use_ema: bool):
  def init(rng):
    params = nn.unbox(init_fn(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if use_ema else None, skipped=jnp.zeros((), jnp.int32))
  return init


def init_sharded(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, rng: jax.Array,
                 mesh: jax.sharding.Mesh, rules, use_ema: bool) -> tuple[TrainState, TrainState]:
  """Build the TrainState directly in its sharded layout: eval_shape -> logical specs -> mesh
  shardings -> `jax.jit(init, out_shardings=...)`. Returns (state, state_shardings); nothing is ever
  materialised unsharded."""
  state_sh = state_shardings(init_fn, tx, rng, mesh, rules, use_ema)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(_init_state(init_fn, tx, use_ema), out_shardings=state_sh)(rng)
  return state, state_sh


def abstract_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                   rng: jax.Array, state_sh: TrainState) -> TrainState:
  """ShapeDtypeStructs with shardings (nothing allocated): the restore target for a checkpoint."""
  shapes = jax.eval_shape(_init_state(init_fn, tx, state_sh.ema_params is not None), rng)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sh)
