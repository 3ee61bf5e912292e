"""Warm starts: `config.init_from=DIR` starts a fresh run from another run's parameters (training stages:
stage 2 from stage 1, stage 3 from stage 2).

DIR is one of (first match):
  - a parameter checkpoint (DIR/meta.json: a run's exported WORKDIR/params_<step>/, or a converter's
    output): its parameters;
  - a train checkpoint step directory (DIR/state, e.g. WORKDIR/checkpoints/<step>): the train state's
    parameters (not its EMA);
  - a run's WORKDIR: its newest exported params_<step>/ (the EMA when the run kept one), else its newest
    train checkpoint.
Every parameter of this model that DIR holds with the same shape is taken (cast to this model's dtype);
parameters new in this model keep their initialisation; a parameter with another shape is a UserError
naming it and both shapes. The optimizer state starts fresh and the EMA starts at the warm parameters.
The loop applies it only on a fresh start: a run that resumes from its own checkpoint ignores init_from.
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

from starflow2_jax import ckpt
from starflow2_jax.errors import UserError
from starflow2_jax.train.state import TrainState

_PARAMS_DIR = re.compile(r"params_(\d+)$")
_LIST_MAX = 20  # names listed in the log line


def _newest(directory: str, pattern: re.Pattern) -> str | None:
  if not os.path.isdir(directory):
    return None
  found = [(int(m.group(1)), n) for n in os.listdir(directory) if (m := pattern.match(n))]
  return os.path.join(directory, max(found)[1]) if found else None


def resolve(init_from: str) -> tuple[str, str]:
  """init_from -> (kind "params" | "train", directory of the parameter or train-state tree)."""
  path = os.path.abspath(os.path.expanduser(init_from))
  if ckpt.is_params_checkpoint(path):
    return "params", path
  if os.path.isdir(os.path.join(path, "state")):
    return "train", path
  exported = _newest(path, _PARAMS_DIR)
  if exported is not None and ckpt.is_params_checkpoint(exported):
    return "params", exported
  step = _newest(os.path.join(path, "checkpoints"), re.compile(r"(\d+)$"))
  if step is not None and os.path.isdir(os.path.join(step, "state")):
    return "train", step
  raise UserError(f"config.init_from={init_from!r}: expected a parameter checkpoint (with meta.json), a "
                  "train checkpoint step directory (with state/) or a run's workdir (with params_<step>/ "
                  "or checkpoints/<step>/); found none of these at " + path)


def load(init_from: str) -> tuple[Any, str]:
  """The stored parameter tree (numpy) and the directory it came from."""
  kind, path = resolve(init_from)
  tree = ckpt.read_tree(os.path.join(path, "params") if kind == "params" else os.path.join(path, "state"))
  return tree["params"], path


def merge(params: Any, stored: Any, what: str) -> tuple[dict[int, np.ndarray], list[str], list[str]]:
  """Match `stored` to the model's `params` (arrays or ShapeDtypeStructs) by path.

  Returns ({leaf index in params: stored array}, names of new parameters, names of unused stored
  ones). A shape mismatch raises UserError naming every such parameter with both shapes."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
  names = [jax.tree_util.keystr(k) for k, _ in flat]
  bad = [f"  {n}: this model {tuple(x.shape)}, {what} {tuple(got[n].shape)}"
         for n, (_, x) in zip(names, flat) if n in got and tuple(got[n].shape) != tuple(x.shape)]
  if bad:
    raise UserError(f"config.init_from: parameter shapes differ from {what}:\n" + "\n".join(bad) +
                    "\nwarm starts take parameters of equal shape only; change the model config or "
                    "init_from")
  taken = {i: np.asarray(got[n]) for i, n in enumerate(names) if n in got}
  new = [n for n in names if n not in got]
  unused = sorted(set(got) - set(names))
  return taken, new, unused


def apply(state: TrainState, state_sh: TrainState, tx: optax.GradientTransformation,
          init_from: str) -> tuple[TrainState, dict[str, list[str]]]:
  """The freshly initialised `state` with the parameters of `init_from` taken where they match.
  Returns (state, {"taken", "new", "unused"} parameter names)."""
  stored, path = load(init_from)
  taken, new, unused = merge(state.params, stored, path)
  leaves, treedef = jax.tree.flatten(state.params)
  shardings = jax.tree.leaves(state_sh.params)

  def placed(i: int, x: jax.Array) -> jax.Array:
    if i not in taken:
      return x
    arr = taken[i].astype(x.dtype)
    return jax.make_array_from_callback(arr.shape, shardings[i], lambda idx: arr[idx])

  params = jax.tree.unflatten(treedef, [placed(i, x) for i, x in enumerate(leaves)])
  opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
  state = state.replace(params=params, opt_state=opt_state,
                        ema_params=None if state.ema_params is None else params)
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  report = {"taken": [names[i] for i in sorted(taken)], "new": new, "unused": unused}
  logging.info("init_from %s: took %d parameters, initialised %d new ones%s, ignored %d stored ones "
               "this model lacks%s", path, len(taken), len(new),
               f" ({', '.join(new[:_LIST_MAX])})" if new else "", len(unused),
               f" ({', '.join(unused[:_LIST_MAX])})" if unused else "")
  return state, report
