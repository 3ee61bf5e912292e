"""The experiment-config shape of a Qwen2.5-VL checkpoint (what `configs/qwen2_5_vl_*.py` return and
what the converter stores next to the weights). Meshes and shardings come from `starflow2_jax.parallel`."""
from __future__ import annotations

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
