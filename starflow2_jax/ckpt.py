"""Parameter checkpoints that carry their config (converters, `launch.sample`, exported models).

Layout of a parameter checkpoint directory DIR:
  DIR/config.json   the model's ml_collections ConfigDict as JSON (the experiment config)
  DIR/meta.json     {"format": "starflow2_jax.params", "version": 1, ...free-form metadata}
  DIR/params/       an orbax PyTree checkpoint of the (unboxed) parameter tree

Nothing a user wrote is overwritten: saving into an existing non-empty directory is an error. Saving is
multi-process safe: every process writes its own shards of the (possibly sharded) arrays, process 0
writes config.json and, once every shard is written, meta.json.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from starflow2_jax.errors import UserError

FORMAT = "starflow2_jax.params"


def _abs(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


def save_params(out_dir: str, params: Any, config: ml_collections.ConfigDict,
                metadata: dict | None = None) -> str:
  """Write params + config to a new directory `out_dir` (called by every process). Returns its
  absolute path."""
  out_dir = _abs(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(
        f"refusing to write a checkpoint into non-empty directory {out_dir}: choose a new --out")
  multihost_utils.sync_global_devices(f"save_params_checked_{out_dir}")  # before anyone writes
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  multihost_utils.sync_global_devices(f"save_params_dir_{out_dir}")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "params"), params)
  multihost_utils.sync_global_devices(f"save_params_saved_{out_dir}")
  if jax.process_index() == 0:  # written last: marks a complete checkpoint
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
      json.dump({"format": FORMAT, "version": 1, **(metadata or {})}, f, indent=2)
  multihost_utils.sync_global_devices(f"save_params_done_{out_dir}")
  return out_dir


def is_params_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(_abs(path), "meta.json"))


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config stored with a checkpoint."""
  path = _abs(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{path} is not a starflow2_jax checkpoint: {cfg_path} is missing")
  with open(cfg_path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_params(path: str, abstract_params: Any = None, shardings: Any = None) -> Any:
  """Restore the parameter tree. With `abstract_params` (e.g. from `jax.eval_shape(init)`), shapes are
  checked against it first, and a mismatch names every differing parameter and both shapes."""
  path = _abs(path)
  if not is_params_checkpoint(path):
    raise FileNotFoundError(f"{path} is not a complete starflow2_jax parameter checkpoint "
                            "(meta.json missing: was the save interrupted?)")
  with ocp.StandardCheckpointer() as ckptr:
    if abstract_params is None:
      return ckptr.restore(os.path.join(path, "params"))
    stored = ckptr.metadata(os.path.join(path, "params"))
    stored = getattr(stored, "item_metadata", stored)
    check_tree_shapes(abstract_params, stored, what=f"checkpoint {path}")
    if shardings is not None:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_params, shardings)
    else:
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    return ckptr.restore(os.path.join(path, "params"), target)


def read_tree(path: str) -> Any:
  """Every array of the orbax PyTree checkpoint at `path` (whatever tree it holds, saved on whatever
  mesh) as numpy arrays, on every process."""
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(path)
    stored = getattr(stored, "item_metadata", stored)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), stored)
    return jax.tree.map(np.asarray, ckptr.restore(path, target))


def check_tree_shapes(expected: Any, found: Any, what: str) -> None:
  """Raise UserError (a ValueError) listing missing/extra keys and shape mismatches between two trees."""
  exp = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
         jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
         jax.tree_util.tree_flatten_with_path(found)[0]}
  problems = [f"  {k}: expected {exp[k]}, found {got[k]}" for k in exp if k in got and exp[k] != got[k]]
  problems += [f"  {k}: expected {exp[k]}, missing" for k in exp if k not in got]
  problems += [f"  {k}: unexpected parameter of shape {got[k]}" for k in got if k not in exp]
  if problems:
    raise UserError(f"{what} does not match the model config:\n" + "\n".join(problems[:50]) +
                    (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""))


def to_numpy_tree(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)
