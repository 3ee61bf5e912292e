"""Import a Hugging Face DINOv2 checkpoint directory (CHECKPOINT-LAYOUTS.md section c).

Reads config.json and the (sharded) safetensors tensor by tensor: every parameter is built with
`jax.make_array_from_callback` straight into its target sharding, each device reading only its slice of
the memory-mapped file. The L encoder layers are written stacked (`layers/stack/...` [L, ...]).
Both namings are accepted: the Hub's (`attention.attention.query`, the fused SwiGLU `mlp.weights_in`
whose first half of rows is the gate, `mlp.weights_out`) and transformers 5's in-memory one
(`attention.q_proj`, `mlp.gate_proj` / `up_proj` / `down_proj`). Every key is consumed except
`embeddings.mask_token` (masked pre-training only). The position table is resized here, once, for the
requested input size with Hugging Face's exact rule (`fae.dinov2.resize_position_table`).

Library: `load_hf_dinov2(dir, input_size=(H, W)) -> (params, config)`, `convert(dir, out)`.
Command line: python -m launch.convert --from=hf_dinov2 --checkpoint=DIR --out=DIR [--input_size=224]
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from starflow2_jax import ckpt, parallel
from starflow2_jax.convert.hf_qwen2_5_vl import all_devices_mesh, read_hf_config
from starflow2_jax.convert.safetensors_io import PARAM_DTYPES, SafetensorsDir
from starflow2_jax.errors import UserError
from starflow2_jax.fae import dinov2 as dinov2_lib
from starflow2_jax.fae.dinov2 import Dinov2Config

ARCHITECTURE = "Dinov2Model"
MODEL_TYPE = "dinov2"
IGNORED = ("embeddings.mask_token",)  # used only by masked-image pre-training
# Our layer parameter (under layers/stack/) -> its Hugging Face names (Hub first, transformers 5 second).
_LAYER = {
    "norm1": ("norm1",), "norm2": ("norm2",),
    "attn/q": ("attention.attention.query", "attention.q_proj"),
    "attn/k": ("attention.attention.key", "attention.k_proj"),
    "attn/v": ("attention.attention.value", "attention.v_proj"),
    "attn/out": ("attention.output.dense", "attention.o_proj"),
    "ls1": ("layer_scale1",), "ls2": ("layer_scale2",),
    "mlp/fc1": ("mlp.fc1",), "mlp/fc2": ("mlp.fc2",),
    "mlp/down": ("mlp.weights_out", "mlp.down_proj"),
}
_SWIGLU_IN = {"mlp/gate": (0, "mlp.gate_proj"), "mlp/up": (1, "mlp.up_proj")}  # half of weights_in
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight"}


def config_from_hf(hf: dict, input_size: tuple[int, int] | None, dtype: str) -> ml_collections.ConfigDict:
  """config.json -> our experiment config {model_kind: dinov2, model: Dinov2Config fields}."""
  archs = hf.get("architectures") or []
  if hf.get("model_type") != MODEL_TYPE or (archs and ARCHITECTURE not in archs):
    raise UserError(f"config.json: expected model_type {MODEL_TYPE!r} / architecture {ARCHITECTURE}, "
                    f"found model_type {hf.get('model_type')!r} / architectures {archs} (DINOv2 with "
                    "registers and task heads are other architectures)")
  swiglu = bool(hf.get("use_swiglu_ffn", False))
  if not swiglu and hf.get("hidden_act", "gelu") != "gelu":
    raise UserError(f"config.json: expected hidden_act 'gelu' (exact) for the plain MLP, found "
                    f"{hf.get('hidden_act')!r}")
  for key in ("image_size", "patch_size"):
    if not isinstance(hf.get(key), int):
      raise UserError(f"config.json: expected an integer {key} (square images and patches), found "
                      f"{hf.get(key)!r}")
  model = Dinov2Config(
      hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], patch_size=hf["patch_size"], image_size=hf["image_size"],
      input_size=None if input_size is None else tuple(int(v) for v in input_size),
      mlp="swiglu" if swiglu else "gelu", mlp_ratio=float(hf.get("mlp_ratio", 4)),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
      layerscale_value=float(hf.get("layerscale_value", 1.0)), qkv_bias=bool(hf.get("qkv_bias", True)),
      num_channels=int(hf.get("num_channels", 3)), dtype=dtype, param_dtype=dtype)
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim != model.head_dim:
    raise UserError(f"config.json: head_dim {head_dim} is not hidden_size / num_attention_heads = "
                    f"{model.head_dim}; such models are not supported")
  return ml_collections.ConfigDict({"model_kind": dinov2_lib.MODEL_KIND, "model": model.to_dict()})


def _kernel(t: np.ndarray) -> np.ndarray:
  return t.T  # torch Linear [out, in] -> Dense [in, out] (a lazy transposed view)


def load_hf_dinov2(checkpoint: str, *, input_size: tuple[int, int] | None = None,
                   dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                   expected: Dinov2Config | None = None, rules=parallel.DEFAULT_LOGICAL_RULES):
  """Hugging Face directory -> (params placed with their target sharding, experiment config).

  input_size: (H, W) pixels the model will take (its position table is resized for it; None = the
  native image_size). dtype: 'bfloat16' | 'float32' | None (the file's). expected: a Dinov2Config whose
  architecture fields must match config.json's (e.g. an FAE config's dinov2 section).
  """
  files = SafetensorsDir(checkpoint)
  names = set(files.keys())
  dtype = files.param_dtype(dtype)
  config = config_from_hf(read_hf_config(checkpoint), input_size, dtype)
  cfg = Dinov2Config.from_config(config.model)
  if expected is not None:
    check_same_model(expected, cfg, checkpoint)
  abstract = dinov2_lib.abstract_params(cfg)
  shardings = parallel.param_shardings(abstract, mesh, rules)
  target = PARAM_DTYPES[dtype]
  used = set(n for n in IGNORED if n in names)

  def tensor(name: str, ours: str, shape) -> np.ndarray:
    """The file's tensor `name` (lazy), its stored shape checked against `shape` (torch layout)."""
    if name not in names:
      raise UserError(f"{checkpoint}: tensor {name} (for {ours}, shape {tuple(shape)}) is missing; "
                      "does config.json describe this file?")
    used.add(name)
    t = files.get(name)
    if tuple(t.shape) != tuple(shape):
      raise UserError(f"{checkpoint}: tensor {name}: expected shape {tuple(shape)} from config.json "
                      f"(as {ours}), found {tuple(t.shape)}; the file does not match its config")
    return t

  def pick(options: tuple[str, ...], layer: int, suffix: str) -> str:
    full = [f"encoder.layer.{layer}.{o}.{suffix}" for o in options]
    return next((n for n in full if n in names), full[0])

  def layer_view(mods: tuple[str, ...], leaf: str, layer: int, shape) -> np.ndarray:
    """Our stacked parameter's slice for one layer, shape `shape` (ours), as a lazy view."""
    key = "/".join(mods)
    ours = f"layers/stack/{key}/{leaf} (layer {layer})"
    hf_shape = shape[::-1] if leaf == "kernel" else shape
    if key in _SWIGLU_IN:
      half, new_name = _SWIGLU_IN[key]
      new = f"encoder.layer.{layer}.{new_name}.{_LEAF[leaf]}"
      if new in names:
        t = tensor(new, ours, hf_shape)
      else:
        fused_shape = (2 * hf_shape[0],) + tuple(hf_shape[1:])
        t = tensor(f"encoder.layer.{layer}.mlp.weights_in.{_LEAF[leaf]}", ours, fused_shape)
        t = t[half * hf_shape[0]:(half + 1) * hf_shape[0]]
    else:
      suffix = "lambda1" if key in ("ls1", "ls2") else _LEAF[leaf]
      t = tensor(pick(_LAYER[key], layer, suffix), ours, hf_shape)
    return _kernel(t) if leaf == "kernel" else t

  def top_level(path: tuple[str, ...], shape) -> np.ndarray:
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
    name = "/".join(path)
    if path == ("patch_embed", "kernel"):
      w = tensor("embeddings.patch_embeddings.projection.weight", name, (d, c, p, p))
      return w.reshape(d, c * p * p).T  # (C, P, P) flattened, as fae.dinov2.patchify
    if path == ("patch_embed", "bias"):
      return tensor("embeddings.patch_embeddings.projection.bias", name, (d,))
    if path == ("cls_token",):
      return tensor("embeddings.cls_token", name, (1, 1, d)).reshape(d)
    if path == ("pos_embed",):
      native = cfg.native_grid
      table = tensor("embeddings.position_embeddings", name, (1, 1 + native * native, d))[0]
      return dinov2_lib.resize_position_table(np.asarray(table), native, cfg.grid, cfg.input_hw)
    if path[0] == "norm":
      return tensor(f"layernorm.{_LEAF[path[1]]}", name, (d,))
    raise KeyError(f"no Hugging Face tensor for parameter {name}")

  def load(path, leaf, sharding):
    keys = tuple(k.key for k in path)
    if keys[:2] != ("layers", "stack"):
      v = top_level(keys, leaf.shape)
      if tuple(v.shape) != tuple(leaf.shape):
        raise UserError(f"{checkpoint}: {'/'.join(keys)}: expected shape {tuple(leaf.shape)}, found "
                        f"{tuple(v.shape)} after conversion")
      return jax.make_array_from_callback(leaf.shape, sharding,
                                          lambda idx: np.asarray(v[idx]).astype(target))
    per_layer = [layer_view(keys[2:-1], keys[-1], l, leaf.shape[1:]) for l in range(leaf.shape[0])]

    def read(idx):  # idx[0] selects layers, the rest slices each layer's tensor
      return np.stack([np.asarray(per_layer[l][idx[1:]]).astype(target)
                       for l in range(leaf.shape[0])[idx[0]]])

    return jax.make_array_from_callback(leaf.shape, sharding, read)

  params = jax.tree_util.tree_map_with_path(load, nn.unbox(abstract), shardings)
  unused = sorted(names - used)
  if unused:
    raise UserError(f"{checkpoint}: {len(unused)} tensor(s) not consumed by the import: {unused[:10]} "
                    "(a DINOv2 with registers or a task head? only Dinov2Model is supported)")
  return params, config


# Dinov2Config fields that say how to run the model, not what its weights are.
_RUN_FIELDS = ("input_size", "attention_impl", "remat", "scan_layers", "dtype", "param_dtype")


def check_same_model(expected: Dinov2Config, found: Dinov2Config, checkpoint: str) -> None:
  """Raise naming every architecture field where the expected config and config.json disagree."""
  exp, got = expected.to_dict(), found.to_dict()
  diffs = [f"  dinov2.{k}: expected {exp[k]!r}, found {got[k]!r}" for k in sorted(exp)
           if k not in _RUN_FIELDS and exp[k] != got[k]]
  if diffs:
    raise UserError(f"{checkpoint}/config.json does not match the requested DINOv2 config:\n" +
                    "\n".join(diffs))


def expected_dinov2(config: ml_collections.ConfigDict | None) -> Dinov2Config | None:
  """The DINOv2 described by a `--config`: an FAE config's fae.dinov2, or a DINOv2 config's model."""
  if config is None:
    return None
  if "fae" in config:
    return Dinov2Config.from_config(config.fae.dinov2)
  if config.get("model_kind", None) == dinov2_lib.MODEL_KIND:
    return Dinov2Config.from_config(config.model)
  raise UserError(f"--config: expected an FAE config (with a fae.dinov2 section) or a DINOv2 config "
                  f"(model_kind {dinov2_lib.MODEL_KIND!r}), found model_kind "
                  f"{config.get('model_kind', None)!r}")


def convert(checkpoint: str, out: str, *, input_size: tuple[int, int] | None = None,
            dtype: str | None = None, expected: ml_collections.ConfigDict | None = None,
            mesh: jax.sharding.Mesh | None = None) -> str:
  """Hugging Face directory -> a starflow2_jax parameter checkpoint (orbax + config.json).

  input_size: (H, W) for the position table; default: an FAE `expected` config's dinov2.input_size,
  else the model's native size."""
  want = expected_dinov2(expected)
  if input_size is None and want is not None and want.input_size is not None:
    input_size = want.input_hw
  params, config = load_hf_dinov2(checkpoint, input_size=input_size, dtype=dtype, expected=want,
                                  mesh=mesh or all_devices_mesh())
  return ckpt.save_params(out, params, config, {"source": "hf_dinov2",
                                                "checkpoint": os.path.abspath(checkpoint)})


__all__ = ["load_hf_dinov2", "convert", "config_from_hf", "check_same_model"]
