"""Import a Hugging Face Qwen2.5-VL checkpoint directory (CHECKPOINT-LAYOUTS.md §b).

Reads config.json and the (sharded) safetensors tensor by tensor: every parameter is built with
`jax.make_array_from_callback` straight into its target sharding, each device reading only its slice of
the memory-mapped file, so no host holds the whole model. The decoder layers are written stacked
(`layers/stack/...` [L, ...]) and so are the vision blocks (`visual/blocks/...` [depth, ...]): each
stacked parameter reads its slice of every layer's tensor lazily.
Every key of the file is consumed or the
import fails; shapes are checked against the model config with messages naming key and shapes.

Library: `load_hf_qwen2_5_vl(dir) -> (params, config)`, `convert(dir, out)`.
Command line: python -m launch.convert --from=hf_qwen2_5_vl --checkpoint=DIR --out=DIR
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from starflow2_jax import ckpt, parallel
from starflow2_jax.convert.safetensors_io import PARAM_DTYPES, SafetensorsDir
from starflow2_jax.errors import UserError
from starflow2_jax.vlm import config as vlm_config
from starflow2_jax.vlm.model import QwenConfig, abstract_params

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPE = "qwen2_5_vl"


def read_hf_config(directory: str) -> dict:
  path = os.path.join(os.path.abspath(os.path.expanduser(directory)), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: --checkpoint must be a Hugging Face model directory")
  with open(path) as f:
    return json.load(f)


def config_from_hf(hf: dict, dtype: str) -> ml_collections.ConfigDict:
  """Hugging Face config.json (flat or with text_config; rope_scaling or rope_parameters) -> our
  experiment config. Text fields are read from text_config when present, else from the top level."""
  archs = hf.get("architectures") or []
  if hf.get("model_type") != MODEL_TYPE or (archs and ARCHITECTURE not in archs):
    raise UserError(f"config.json: expected model_type {MODEL_TYPE!r} / architecture {ARCHITECTURE}, "
                    f"found model_type {hf.get('model_type')!r} / architectures {archs}")
  text = hf.get("text_config") or hf

  def get(key, default=None):
    return text.get(key, hf.get(key, default))

  if get("use_sliding_window", False):
    raise UserError("config.json: use_sliding_window is true; sliding-window attention is not "
                    "supported")
  if get("hidden_act", "silu") != "silu":
    raise UserError(f"config.json: expected hidden_act 'silu', found {get('hidden_act')!r}")
  rope = get("rope_parameters") or {}
  rope_scaling = get("rope_scaling") or {}
  theta = rope.get("rope_theta", get("rope_theta", 1e6))
  section = rope.get("mrope_section") or rope_scaling.get("mrope_section")
  heads, hidden = get("num_attention_heads"), get("hidden_size")
  if section is None or sum(section) * 2 * heads != hidden:
    raise UserError(f"config.json: mrope_section must sum to head_dim/2 = {hidden // heads // 2}, "
                    f"found {section}")
  eos = get("eos_token_id")
  model = dict(
      vocab_size=get("vocab_size"), hidden_size=hidden, intermediate_size=get("intermediate_size"),
      num_layers=get("num_hidden_layers"), num_heads=heads,
      num_kv_heads=get("num_key_value_heads") or heads, rms_norm_eps=float(get("rms_norm_eps")),
      rope_theta=float(theta), mrope_section=list(section),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
      max_position_embeddings=get("max_position_embeddings", 128000), dtype=dtype, param_dtype=dtype,
      image_token_id=hf.get("image_token_id", 151655), video_token_id=hf.get("video_token_id", 151656),
      vision_start_token_id=hf.get("vision_start_token_id", 151652),
      vision_end_token_id=hf.get("vision_end_token_id", 151653),
      bos_token_id=get("bos_token_id"), eos_token_id=list(eos) if isinstance(eos, list) else [eos],
      pad_token_id=get("pad_token_id"), image_positions="mrope")
  v = hf.get("vision_config")
  vision = None
  if v is not None:
    vision = dict(
        depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"], patch_size=v["patch_size"],
        temporal_patch_size=v["temporal_patch_size"], spatial_merge_size=v["spatial_merge_size"],
        window_size=v["window_size"], fullatt_block_indexes=list(v["fullatt_block_indexes"]),
        in_channels=v.get("in_channels", v.get("in_chans", 3)), tokens_per_second=v["tokens_per_second"],
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    if vision["out_hidden_size"] != hidden:
      raise UserError(f"config.json: vision_config.out_hidden_size must equal hidden_size {hidden}, "
                      f"found {vision['out_hidden_size']}")
  return vlm_config.experiment_config(model, vision)


def normalise_key(key: str) -> str:
  """transformers 4.5x in-memory names -> Hub / transformers-5 names (CL §b.4 pitfall 3)."""
  if key.startswith("model.language_model."):
    return "model." + key[len("model.language_model."):]
  if key.startswith("model.visual."):
    return key[len("model."):]
  return key


_LM_LAYER = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm",
             "attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj", "attn/v": "self_attn.v_proj",
             "attn/out": "self_attn.o_proj",
             "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj", "mlp/down": "mlp.down_proj"}
_VIS_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn/qkv": "attn.qkv", "attn/out": "attn.proj",
              "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj", "mlp/down": "mlp.down_proj"}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def is_stacked(path: tuple[str, ...]) -> bool:
  """Is this parameter stacked on a leading layer axis (decoder layers, vision blocks)?"""
  return path[:2] in (("layers", "stack"), ("visual", "blocks"))


def hf_name(path: tuple[str, ...], layer: int | None = None) -> str:
  """Our parameter path (and the layer, for a stacked one) -> the Hugging Face tensor name."""
  *mods, leaf = path
  suffix = _LEAF[leaf]
  if mods[0] == "embed_tokens":
    return f"model.embed_tokens.{suffix}"
  if mods[0] == "norm":
    return "model.norm.weight"
  if mods[0] == "lm_head":
    return "lm_head.weight"
  if mods[0] == "layers":
    return f"model.layers.{layer}.{_LM_LAYER['/'.join(mods[2:])]}.{suffix}"
  if mods[0] == "visual":
    if mods[1] == "patch_embed":
      return "visual.patch_embed.proj.weight"
    if mods[1] == "ln_q":
      return "visual.merger.ln_q.weight"
    if mods[1].startswith("merger_fc"):
      return f"visual.merger.mlp.{0 if mods[1] == 'merger_fc1' else 2}.{suffix}"
    return f"visual.blocks.{layer}.{_VIS_BLOCK['/'.join(mods[2:])]}.{suffix}"
  raise KeyError(f"no Hugging Face name for parameter {'/'.join(path)}")


def _as_ours(path: tuple[str, ...], t: np.ndarray) -> np.ndarray:
  """A lazy view of the HF tensor in our layout (Linear weights transposed, Conv3d flattened)."""
  if path[-1] != "kernel":
    return t
  if path[-2] == "patch_embed":
    return t.reshape(t.shape[0], -1).T  # (C, T, P, P) flattened, as the processor emits patches
  return t.T


def load_hf_qwen2_5_vl(checkpoint: str, *, dtype: str | None = None,
                       mesh: jax.sharding.Mesh | None = None,
                       expected: ml_collections.ConfigDict | None = None,
                       rules=parallel.DEFAULT_LOGICAL_RULES):
  """Hugging Face directory -> (params placed with their target sharding, experiment config).

  dtype: 'bfloat16' | 'float32' | None (the file's dtype). expected: an experiment config whose
  `model` fields must match the ones derived from config.json (e.g. configs/qwen2_5_vl_7b.py).
  mesh, rules: where the parameters are placed (None = one device).
  """
  files = SafetensorsDir(checkpoint)
  file_keys = {normalise_key(k): k for k in files.keys()}
  dtype = files.param_dtype(dtype)
  config = config_from_hf(read_hf_config(checkpoint), dtype)
  if expected is not None:
    check_same_model(expected, config, checkpoint)
  cfg = QwenConfig.from_config(config.model)
  abstract = abstract_params(cfg)
  shardings = parallel.param_shardings(abstract, mesh, rules)
  if cfg.tie_word_embeddings and "lm_head.weight" in file_keys:
    raise UserError(f"{checkpoint}: config.json says tie_word_embeddings=true, but the file holds "
                    "lm_head.weight (an untied head); fix the config or the file")
  used = set()

  def view(names, name, shape):
    """The lazy view of HF tensor `name` in our layout, checked against our `shape`."""
    if name not in file_keys:
      raise KeyError(f"{checkpoint}: tensor {name} (for {'/'.join(names)}, shape {shape}) is missing")
    used.add(name)
    v = _as_ours(names, files.get(file_keys[name]))
    if tuple(v.shape) != tuple(shape):
      raise UserError(f"{checkpoint}: tensor {name}: expected shape {tuple(shape)} (as "
                      f"{'/'.join(names)}), found {tuple(v.shape)} after conversion "
                      f"(stored {files.shape(file_keys[name])})")
    return v

  def load(path, leaf, sharding):
    names = tuple(k.key for k in path)
    target = PARAM_DTYPES[dtype]
    if not is_stacked(names):
      v = view(names, hf_name(names), leaf.shape)
      return jax.make_array_from_callback(leaf.shape, sharding,
                                          lambda idx: np.asarray(v[idx]).astype(target))
    per_layer = [view(names, hf_name(names, l), leaf.shape[1:]) for l in range(leaf.shape[0])]

    def read(idx):  # idx[0] selects layers, the rest slices each layer's tensor
      return np.stack([np.asarray(per_layer[l][idx[1:]]).astype(target)
                       for l in range(leaf.shape[0])[idx[0]]])

    return jax.make_array_from_callback(leaf.shape, sharding, read)

  params = jax.tree_util.tree_map_with_path(load, nn.unbox(abstract), shardings)
  unused = sorted(set(file_keys) - used)
  if unused:
    raise UserError(f"{checkpoint}: {len(unused)} tensor(s) not consumed by the import: {unused[:10]}"
                    " (does config.json describe this file?)")
  return params, config


def check_same_model(expected: ml_collections.ConfigDict, found: ml_collections.ConfigDict,
                     checkpoint: str) -> None:
  """Raise naming every config.model field where the expected config and config.json disagree."""
  skip = {"dtype", "param_dtype", "remat", "scan_layers"}  # how to run, not what the weights are
  exp, got = expected.model.to_dict(), found.model.to_dict()
  diffs = [f"  model.{k}: expected {exp[k]!r}, found {got.get(k)!r}"
           for k in sorted(exp) if k not in skip and _norm(exp[k]) != _norm(got.get(k))]
  if diffs:
    raise UserError(f"{checkpoint}/config.json does not match the requested config:\n" +
                    "\n".join(diffs))


def _norm(v):
  if isinstance(v, dict):
    return {k: _norm(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_norm(x) for x in v]
  return v


def all_devices_mesh() -> jax.sharding.Mesh:
  """Every device on the `fsdp` axis: the converted model lives spread over the devices, and the host
  only ever holds one tensor slice."""
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((jax.device_count(), 1), ("fsdp", "tensor"), axis_types=auto)


def convert(checkpoint: str, out: str, *, dtype: str | None = None,
            expected: ml_collections.ConfigDict | None = None,
            mesh: jax.sharding.Mesh | None = None) -> str:
  """Hugging Face directory -> a starflow2_jax parameter checkpoint (orbax + config.json), placed on
  `mesh` (default: all devices, FSDP) while it is written."""
  params, config = load_hf_qwen2_5_vl(checkpoint, dtype=dtype, expected=expected,
                                      mesh=mesh or all_devices_mesh())
  return ckpt.save_params(out, params, config, {"source": "hf_qwen2_5_vl",
                                                "checkpoint": os.path.abspath(checkpoint)})
