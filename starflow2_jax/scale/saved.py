"""A compiled train step on disk: `launch.compile --save=FILE` writes it, `launch.train
--compiled_step=FILE` runs it instead of compiling (as MaxText's `train_compile` does).

The file (a pickle) holds the serialized executable (`jax.experimental.serialize_executable`), its
argument and result tree structures, and what it was compiled for: the step-relevant config sections
(`STEP_SECTIONS`, after `scale.abstract.with_train_defaults`), and the signature of its arguments (tree
structure, shapes, dtypes, shardings), the mesh, the device kind and count, and the JAX version. Loading
checks all of them against the run and names each difference (UserError): an executable bakes in
the learning-rate schedule, the loss and every shape.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Any

import jax
import ml_collections
from jax.experimental import serialize_executable

from starflow2_jax.errors import UserError

FORMAT = "starflow2_jax.compiled_step/1"
# The config sections a train step depends on (data: only the image shape; log, checkpoint, sample and
# init_from do not enter the step).
STEP_SECTIONS = ("model_kind", "model", "train", "mesh", "sharding")
DATA_FIELDS = ("image_size", "channels")
MAX_DIFFERENCES = 10  # differences named in the error


def step_config(config: ml_collections.ConfigDict) -> dict:
  """The flattened {dotted field: value} of the config sections the step depends on."""
  from starflow2_jax.scale import abstract
  full = abstract.with_train_defaults(config).to_dict()
  out: dict[str, Any] = {}

  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}.{k}" if prefix else str(k), v)
    else:
      out[prefix] = json.loads(json.dumps(value, default=str))

  for key in STEP_SECTIONS:
    if key in full:
      walk(key, full[key])
  for key in DATA_FIELDS:
    walk(f"data.{key}", full.get("data", {}).get(key))
  return out


def signature(args: Any, mesh: jax.sharding.Mesh) -> dict:
  """What the executable's arguments must be: {path: "shape dtype spec"}, the tree, the mesh, devices."""
  leaves = {}
  for path, x in jax.tree_util.tree_flatten_with_path(args)[0]:
    sharding = getattr(x, "sharding", None)  # only a NamedSharding is compared (not a device-local key)
    spec = str(sharding.spec) if isinstance(sharding, jax.sharding.NamedSharding) else None
    leaves[jax.tree_util.keystr(path)] = [str(tuple(x.shape)), str(x.dtype), spec]
  return {"tree": str(jax.tree_util.tree_structure(args)), "leaves": leaves,
          "mesh": {k: int(v) for k, v in mesh.shape.items()},
          "devices": int(mesh.size), "device_kind": mesh.devices.flat[0].device_kind,
          "jax": jax.__version__}


def save(path: str, compiled, config: ml_collections.ConfigDict, args: Any,
         mesh: jax.sharding.Mesh) -> str:
  """Write `compiled` (the train step of `config` on `mesh`) to `path`; never overwrites a file."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path):
    raise UserError(f"--save={path} exists; choose a new file name (a saved step is never overwritten)")
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    pickle.dump({"format": FORMAT, "executable": payload, "in_tree": in_tree, "out_tree": out_tree,
                 "config": step_config(config), "signature": signature(args, mesh)}, f)
  os.replace(path + ".tmp", path)
  return path


def _differences(want: dict, found: dict, what: str) -> list[str]:
  keys = sorted(set(want) | set(found))
  return [f"{what} {k}: compiled for {want.get(k, '(absent)')!r}, this run has {found.get(k, '(absent)')!r}"
          for k in keys if want.get(k) != found.get(k)]


def load(path: str, config: ml_collections.ConfigDict, args: Any, mesh: jax.sharding.Mesh):
  """The saved step as a callable `compiled(state, frozen, batch, rng)`, after checking that it was
  compiled for this config, these arguments and this mesh (UserError naming each difference)."""
  if not os.path.isfile(path):
    raise UserError(f"--compiled_step={path}: no such file; write one with "
                    "`python -m launch.compile --config=... --topology=... --save=FILE`")
  with open(path, "rb") as f:
    saved = pickle.load(f)
  if not isinstance(saved, dict) or saved.get("format") != FORMAT:
    raise UserError(f"--compiled_step={path} is not a compiled train step of launch.compile "
                    f"(expected format {FORMAT!r})")
  found_sig = signature(args, mesh)
  diffs = _differences(saved["config"], step_config(config), "config")
  want_sig = saved["signature"]
  diffs += _differences({k: v for k, v in want_sig.items() if k != "leaves"},
                        {k: v for k, v in found_sig.items() if k != "leaves"}, "step")
  want_leaves, found_leaves = want_sig["leaves"], found_sig["leaves"]
  for k in set(want_leaves) & set(found_leaves):  # a spec only where both sides have a mesh sharding
    if want_leaves[k][2] is None or found_leaves[k][2] is None:
      want_leaves[k], found_leaves[k] = want_leaves[k][:2], found_leaves[k][:2]
  diffs += _differences(want_leaves, found_leaves, "argument")
  if diffs:
    more = f"\n  ... and {len(diffs) - MAX_DIFFERENCES} more" if len(diffs) > MAX_DIFFERENCES else ""
    raise UserError(f"--compiled_step={path} was compiled for another run:\n  " +
                    "\n  ".join(diffs[:MAX_DIFFERENCES]) + more +
                    "\nrecompile it with launch.compile for this config and topology, or drop "
                    "--compiled_step to compile at start-up")
  return serialize_executable.deserialize_and_load(saved["executable"], saved["in_tree"],
                                                    saved["out_tree"])
