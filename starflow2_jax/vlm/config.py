"""The experiment-config shape of a Qwen2.5-VL checkpoint (what `configs/qwen2_5_vl_*.py` return and
what the converter stores next to the weights). Meshes and shardings come from `starflow2_jax.parallel`."""
from __future__ import annotations

import ml_collections

MODEL_KIND = "qwen2_5_vl"

# Rows of the embedding past the tokenizer's vocabulary are padding; sampling masks them.
QWEN_TOKENIZER_VOCAB = 151665


def experiment_config(model: dict, vision: dict | None) -> ml_collections.ConfigDict:
  """config.model_kind, config.model (Qwen fields, config.model.vision or None). No sharding rules:
  the caller's mesh and `parallel.DEFAULT_LOGICAL_RULES` (or its config's override) decide."""
  config = ml_collections.ConfigDict()
  config.model_kind = MODEL_KIND
  config.model = ml_collections.ConfigDict(dict(model))
  config.model.vision = None if vision is None else ml_collections.ConfigDict(dict(vision))
  return config
