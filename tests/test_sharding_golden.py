"""Property 49: every parameter's and every KV-cache buffer's PartitionSpec for the paper configs on named
meshes matches the checked-in JSON (tests/golden/sharding_*.json), so a layout change fails CI; no
parameter over 4 MiB is fully replicated unless the rules replicate every one of its axes.

Everything comes from `jax.eval_shape` (no allocation) on `AbstractMesh`es (no devices needed).
After an intended layout change, regenerate the JSON with one command from the repository root:
  PYTHONPATH=$PWD python tests/test_sharding_golden.py
"""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from starflow2_jax import parallel

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
# Named (data, fsdp, tensor) meshes: one v5e-8 host (pure FSDP) and a 128-chip pod slice.
MESHES = {"fsdp8": (1, 8, 1), "pod128": (2, 16, 4)}
CONFIGS = ("qwen2_5_vl_7b", "tarflow_imagenet64")
# Cache shapes recorded: a 32-row VLM batch of 4096 slots (prompt + answer), and each flow block's
# cache for the 64 training samples (config.log.num_samples of tarflow_imagenet64).
VLM_CACHE_BATCH, VLM_CACHE_LEN = 32, 4096
FLOW_CACHE_BATCH = 64
REPLICATED_LIMIT_BYTES = 4 * 2 ** 20  # property 49: "no parameter over 4 MiB fully replicated"


def _boxed_params_and_caches(name: str):
  """-> (boxed abstract parameters, {cache name: abstract KVCache}) of configs/<name>.py."""
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config()
  if config.model_kind == "qwen2_5_vl":
    from starflow2_jax.vlm.model import QwenConfig, abstract_params
    cfg = QwenConfig.from_config(config.model)
    caches = {"language_model": jax.eval_shape(lambda: cfg.init_cache(VLM_CACHE_BATCH, VLM_CACHE_LEN))}
    return abstract_params(cfg), caches
  from starflow2_jax.flows import FlowConfig, FlowModel
  from starflow2_jax.flows.block import init_block_cache
  cfg = FlowConfig.from_config(config.model)
  model = FlowModel(cfg)
  tokens = jax.ShapeDtypeStruct((1, cfg.num_tokens, cfg.token_dim), jnp.float32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(lambda t, l: model.init(jax.random.key(0), t, l), tokens, labels)["params"]
  caches = {f"blocks_{i}": jax.eval_shape(lambda i=i: init_block_cache(cfg, i, FLOW_CACHE_BATCH))
            for i in range(cfg.num_blocks)}
  return params, caches


def _spec_json(spec) -> list:
  return [a if a is None or isinstance(a, str) else list(a) for a in spec]


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def layout(name: str) -> dict:
  """{mesh name: {"params": {path: {"shape", "spec"}}, "cache": {...}}} under the default rules."""
  params, caches = _boxed_params_and_caches(name)
  out = {}
  for mesh_name, sizes in MESHES.items():
    mesh = jax.sharding.AbstractMesh(sizes, parallel.MESH_AXES)
    specs = _flat(parallel.logical_to_specs(params, mesh, parallel.DEFAULT_LOGICAL_RULES))
    shapes = _flat(nn.unbox(params))
    entry = {"mesh": dict(zip(parallel.MESH_AXES, sizes)), "params": {}, "cache": {}}
    for path, spec in specs.items():
      entry["params"][path] = {"shape": list(shapes[path].shape), "spec": _spec_json(spec)}
    for cname, cache in caches.items():
      shardings = cache.shardings(mesh, parallel.DEFAULT_LOGICAL_RULES)
      for field in ("k", "v", "valid", "index"):
        entry["cache"][f"{cname}/{field}"] = {"shape": list(getattr(cache, field).shape),
                                              "spec": _spec_json(getattr(shardings, field).spec)}
    out[mesh_name] = entry
  return out


def _golden_path(name: str) -> str:
  return os.path.join(GOLDEN_DIR, f"sharding_{name}.json")


@pytest.mark.parametrize("name", CONFIGS)
def test_layout_matches_golden(name):
  with open(_golden_path(name)) as f:
    golden = json.load(f)
  found = layout(name)
  for mesh_name in MESHES:
    for kind in ("params", "cache"):
      want, got = golden[mesh_name][kind], found[mesh_name][kind]
      assert sorted(got) == sorted(want), (mesh_name, kind, sorted(set(got) ^ set(want)))
      diffs = [f"{p}: golden {want[p]}, found {got[p]}" for p in sorted(got) if got[p] != want[p]]
      assert not diffs, (f"{name} on {mesh_name}: layout changed (regenerate with the command in "
                         "this file's docstring if intended):\n" + "\n".join(diffs[:20]))


@pytest.mark.parametrize("name", CONFIGS)
def test_no_large_parameter_replicated_unless_the_rules_say_so(name):
  params, _ = _boxed_params_and_caches(name)
  rules = dict(parallel.DEFAULT_LOGICAL_RULES)
  names = _flat(nn.get_partition_spec(params))
  shapes = _flat(nn.unbox(params))
  for mesh_name, sizes in MESHES.items():
    mesh = jax.sharding.AbstractMesh(sizes, parallel.MESH_AXES)
    specs = _flat(parallel.logical_to_specs(params, mesh, parallel.DEFAULT_LOGICAL_RULES))
    for path, spec in specs.items():
      x = shapes[path]
      if x.size * x.dtype.itemsize <= REPLICATED_LIMIT_BYTES or any(a is not None for a in spec):
        continue
      assert all(rules.get(n) is None for n in names[path] if n is not None), (
          f"{name} on {mesh_name}: {path} {x.shape} ({x.size * x.dtype.itemsize} bytes) is fully "
          f"replicated although its logical axes {tuple(names[path])} are sharded by the rules")


def test_cache_layout_is_decided_for_a_pod():
  """The 28-layer VLM cache: batch over data x fsdp and KV heads over tensor, layers and slots whole."""
  found = layout("qwen2_5_vl_7b")["pod128"]["cache"]["language_model/k"]
  assert found == {"shape": [28, VLM_CACHE_BATCH, VLM_CACHE_LEN, 4, 128],
                   "spec": [None, ["data", "fsdp"], None, "tensor", None]}


if __name__ == "__main__":
  os.makedirs(GOLDEN_DIR, exist_ok=True)
  sys.path.insert(0, os.path.dirname(GOLDEN_DIR))
  for config_name in CONFIGS:
    with open(_golden_path(config_name), "w") as f:
      json.dump(layout(config_name), f, indent=1, sort_keys=True)
      f.write("\n")
    print("wrote", _golden_path(config_name))
