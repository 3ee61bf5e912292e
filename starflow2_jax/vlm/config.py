"""The experiment-config shape of a Qwen2.5-VL checkpoint (what `configs/qwen2_5_vl_*.py` return and
what the converter stores next to the weights), and the logical-axis helpers for it."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections

MODEL_KIND = "qwen2_5_vl"

# Logical axis -> mesh axis (or None = replicated). FSDP over `embed`, tensor parallelism over heads,
# MLP, vocabulary and the fused vision qkv. Batch goes over data (and fsdp) for activations.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
)

# Rows of the embedding past the tokenizer's vocabulary are padding; sampling masks them.
QWEN_TOKENIZER_VOCAB = 151665


def experiment_config(model: dict, vision: dict | None) -> ml_collections.ConfigDict:
  """config.model_kind, config.model (Qwen fields, config.model.vision or None), config.sharding."""
  config = ml_collections.ConfigDict()
  config.model_kind = MODEL_KIND
  config.model = ml_collections.ConfigDict(dict(model))
  config.model.vision = None if vision is None else ml_collections.ConfigDict(dict(vision))
  config.sharding = ml_collections.ConfigDict()
  config.sharding.logical_rules = [list(r) for r in LOGICAL_RULES]
  return config


def logical_rules(config: ml_collections.ConfigDict) -> tuple:
  """config.sharding.logical_rules (JSON turns tuples into lists) -> flax rules."""
  def mesh_axes(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v
  return tuple((name, mesh_axes(axes)) for name, axes in config.sharding.logical_rules)


def param_shardings(abstract: Any, mesh: jax.sharding.Mesh | None, rules) -> Any:
  """Boxed abstract params -> a tree of shardings (NamedSharding from the logical rules, or one device).

  Small and local on purpose: `starflow2_jax.parallel` will own this once it lands."""
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: dev, nn.unbox(abstract))
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)


def make_mesh(fsdp: int, tensor: int) -> jax.sharding.Mesh:
  """A (data=1, fsdp, tensor) mesh with Auto axes, for inference with the config's rules."""
  auto = (jax.sharding.AxisType.Auto,) * 3
  return jax.make_mesh((1, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=auto)
