"""Import Apple's TarFlow PyTorch checkpoints (apple/ml-tarflow; CHECKPOINT-LAYOUTS.md section a).

The file is a plain `state_dict` written by `torch.save`. The model config (width, blocks, layers per
block, tokens, token dimension, classes) is inferred from the tensor shapes; image and patch size cannot
be told apart from shapes alone, so they come from arguments (defaults: the AFHQ-256 release) and are
checked against the shapes. Every key is consumed: `attn_mask` buffers are checked (lower-triangular
ones) and dropped; the `var` buffer must be all ones (nvp models), which makes the reverse pass's
`sqrt(var)` scaling the identity.

Each block's transformer layers are written stacked: `blocks_{j}/transformer/stack/...` [L, ...].

Library: `params_from_state_dict(sd, image_size, patch_size) -> (variables, FlowConfig)`,
`convert(checkpoint, out, ...)`. Command line:
  python -m launch.convert --from=tarflow_torch --checkpoint=afhq_model_8_768_8_8_0.07.pth \
      --out=/ckpt/tarflow_afhq256 [--image_size=256] [--patch_size=8]
"""
from __future__ import annotations

import math
import os
import re
from typing import Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from starflow2_jax import ckpt
from starflow2_jax.errors import UserError
from starflow2_jax.flows import FlowConfig, FlowModel

CHANNELS = 3  # TarFlow models RGB images
_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, stripped defensively


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Read a `.pth` state_dict with torch (the `[convert]` extra) into float32 numpy arrays."""
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading a PyTorch checkpoint needs torch: pip install -e '.[convert]'") from e
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"TarFlow checkpoint {path} not found")
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(sd, Mapping):
    raise UserError(f"{path}: expected a state_dict (a mapping of names to tensors), found "
                    f"{type(sd).__name__}")
  return {k: v.detach().float().numpy() for k, v in sd.items()}


def _strip(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    for p in _PREFIXES:
      if k.startswith(p):
        k = k[len(p):]
    out[k] = np.asarray(v)
  return out


def infer_config(sd: Mapping[str, np.ndarray], image_size: int, patch_size: int) -> FlowConfig:
  """The FlowConfig of a TarFlow state_dict (shapes) with the given image and patch size."""
  blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
  if not blocks or "blocks.0.proj_in.weight" not in sd:
    raise UserError("not a TarFlow state_dict: no 'blocks.0.proj_in.weight' key")
  if blocks != list(range(len(blocks))):
    raise UserError(f"TarFlow state_dict: block indices {blocks} are not 0..{len(blocks) - 1}")
  layers = []
  for j in blocks:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"blocks\.{j}\.attn_blocks\.(\d+)\.", k))}
    layers.append(max(idx) + 1 if idx else 0)
  width, token_dim = sd["blocks.0.proj_in.weight"].shape
  tokens = sd["blocks.0.pos_embed"].shape[0]
  num_classes = sd["blocks.0.class_embed"].shape[0] if "blocks.0.class_embed" in sd else 0
  if sd["blocks.0.proj_out.weight"].shape[0] != 2 * token_dim:
    raise UserError("volume-preserving TarFlow checkpoints (proj_out with D outputs, learned prior "
                    "variance) are not supported: expected proj_out.weight of shape "
                    f"[{2 * token_dim}, {width}], found {list(sd['blocks.0.proj_out.weight'].shape)}")
  want_tokens, want_dim = (image_size // patch_size) ** 2, CHANNELS * patch_size ** 2
  if (tokens, token_dim) != (want_tokens, want_dim):
    p = int(round(math.sqrt(token_dim / CHANNELS)))
    raise UserError(
        f"--image_size={image_size} --patch_size={patch_size} give {want_tokens} tokens of "
        f"{want_dim} channels, but the checkpoint has {tokens} tokens of {token_dim} channels "
        f"(for RGB that is --patch_size={p} --image_size={int(round(math.sqrt(tokens))) * p})")
  return FlowConfig(
      image_size=(image_size, image_size), channels=CHANNELS, patch_size=patch_size,
      layout="tarflow", parametrisation="tarflow", width=width, head_dim=64,
      layers_per_block=tuple(layers), permutation_rule="tarflow", conditioning="all",
      num_classes=num_classes, positions="learned", norm_eps=1e-5)


def _linear(sd, used, name):
  used.update({f"{name}.weight", f"{name}.bias"})
  return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}


def _norm(sd, used, name):
  used.update({f"{name}.weight", f"{name}.bias"})
  return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def params_from_state_dict(sd: Mapping[str, np.ndarray], image_size: int = 256,
                           patch_size: int = 8):
  """-> ({'params': tree}, FlowConfig). Shapes are checked against the config's own init shapes."""
  sd = _strip(sd)
  cfg = infer_config(sd, image_size, patch_size)
  used: set[str] = set()
  params = {}
  for j, num_layers in enumerate(cfg.layers_per_block):
    b = f"blocks.{j}"
    mask = sd[f"{b}.attn_mask"] if f"{b}.attn_mask" in sd else None
    if mask is not None:
      used.add(f"{b}.attn_mask")
      if not np.array_equal(mask != 0, np.tril(np.ones((cfg.num_tokens,) * 2, bool))):
        raise UserError(f"{b}.attn_mask is not the lower-triangular causal mask")
    blk = {"proj_in": _linear(sd, used, f"{b}.proj_in"), "proj_out": _linear(sd, used, f"{b}.proj_out"),
           "pos_embed": sd[f"{b}.pos_embed"]}
    used.add(f"{b}.pos_embed")
    if cfg.num_classes:
      blk["class_embed"] = sd[f"{b}.class_embed"].reshape(cfg.num_classes, cfg.width)
      used.add(f"{b}.class_embed")
    trunk = []
    for i in range(num_layers):
      a = f"{b}.attn_blocks.{i}"
      trunk.append({
          "norm1": _norm(sd, used, f"{a}.attention.norm"),
          "attn": {"qkv": _linear(sd, used, f"{a}.attention.qkv"),
                   "out": _linear(sd, used, f"{a}.attention.proj")},
          "norm2": _norm(sd, used, f"{a}.mlp.norm"),
          "mlp": {"fc1": _linear(sd, used, f"{a}.mlp.main.0"),
                  "fc2": _linear(sd, used, f"{a}.mlp.main.2")},
      })
    # the trunk's layers are stored stacked on a leading layer axis (nn.Transformer's scan layout)
    blk["transformer"] = {"stack": jax.tree.map(lambda *ls: np.stack(ls), *trunk)}
    params[f"blocks_{j}"] = blk
  if "var" in sd:
    used.add("var")
    if sd["var"].shape != (cfg.num_tokens, cfg.token_dim) or not np.all(sd["var"] == 1.0):
      raise UserError(f"'var' must be all ones of shape [{cfg.num_tokens}, {cfg.token_dim}] for an "
                      f"nvp TarFlow; found shape {list(sd['var'].shape)} with values in "
                      f"[{sd['var'].min():.4g}, {sd['var'].max():.4g}]")
  unused = sorted(set(sd) - used)
  if unused:
    raise UserError(f"TarFlow state_dict has keys the importer does not know: {unused[:20]}")
  variables = {"params": jax.tree.map(lambda a: np.asarray(a, np.float32), params)}
  model = FlowModel(cfg)
  tokens = jax.ShapeDtypeStruct((1, cfg.num_tokens, cfg.token_dim), np.float32)
  labels = jax.ShapeDtypeStruct((1,), np.int32) if cfg.num_classes else None
  expected = jax.eval_shape(lambda t, l: model.init(jax.random.key(0), t, l), tokens, labels)
  ckpt.check_tree_shapes(nn.unbox(expected), variables, what="the converted TarFlow checkpoint")
  return variables, cfg


def experiment_config(cfg: FlowConfig) -> ml_collections.ConfigDict:
  """The config stored with a flow checkpoint: model_kind + model fields."""
  return ml_collections.ConfigDict({"model_kind": "flow", "model": cfg.to_dict()})


def convert(checkpoint: str, out: str, *, image_size: int = 256, patch_size: int = 8,
            expected: ml_collections.ConfigDict | None = None) -> str:
  """`.pth` file -> a parameter checkpoint (orbax) carrying its flow config."""
  variables, cfg = params_from_state_dict(load_state_dict(checkpoint), image_size, patch_size)
  config = experiment_config(cfg)
  if expected is not None:  # keep the experiment's other fields (noise, sampling defaults, ...)
    want, found = FlowConfig.from_config(expected.model).to_dict(), cfg.to_dict()
    diffs = [f"  model.{k}: expected {want[k]!r}, found {found[k]!r}"
             for k in _SHAPE_FIELDS if want[k] != found[k]]
    if diffs:
      raise UserError(f"{checkpoint} does not match --config:\n" + "\n".join(diffs))
    config = expected
  return ckpt.save_params(out, variables, config,
                          {"source": "tarflow_torch", "checkpoint": os.path.abspath(checkpoint)})


# Fields that the weights determine; the rest of an expected config (noise, label drop) is free.
_SHAPE_FIELDS = ("image_size", "channels", "patch_size", "layout", "parametrisation", "width",
                 "head_dim", "layers_per_block", "num_classes", "positions", "permutation_rule")
