"""The Qwen2.5-VL vision tower: patch embedding, window / full attention blocks, 2-D RoPE, patch merger.

Patches arrive as Qwen's processor emits them: one row per 14x14 (x2 frames) patch, flattened in
(C, T, P, P) order, patches listed merge-block-major (each 2x2 merge block contiguous, blocks in raster
order over the merged grid), images concatenated. `preprocess_image` produces that layout.

Hugging Face permutes the patches into window order before the blocks and back after the merger. This
port keeps the natural order and expresses windows as segment masks instead, which is the same
computation (windows are unions of whole merge blocks, and attention is permutation-equivariant once
positions travel with the tokens).

The blocks are stored stacked (`visual/blocks/...` [depth, ...], logical axis `layers`) and applied with
a scan; each block picks its full or window mask from a per-block flag.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.errors import UserError
from starflow2_jax.nn import layers
from starflow2_jax.nn.attention import LAYERS_AXIS, TransformerConfig, TransformerLayer
from starflow2_jax.nn.rope import starflow_2d

# Qwen2-VL image processor constants (OpenAI CLIP normalisation; pixel budget of the HF processor).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  out_hidden_size: int
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  in_channels: int = 3
  tokens_per_second: int = 2  # temporal M-RoPE rate of video frames (Hugging Face vision_config)
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  def trunk(self) -> TransformerConfig:
    return TransformerConfig(
        width=self.hidden_size, num_layers=self.depth, num_heads=self.num_heads, head_dim=self.head_dim,
        mlp_hidden=self.intermediate_size, mlp="swiglu", norm="rmsnorm", norm_eps=self.norm_eps,
        fused_qkv=True, qkv_bias=True, out_bias=True, mlp_bias=True, rope_layout="half",
        dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))


def layout(grids: Sequence[tuple[int, int, int]], cfg: VisionConfig):
  """Static per-patch metadata for images with patch grids (t, h, w) (before merging).

  Returns numpy arrays over all N patches, in the processor's merge-block-major order:
  pos [N, 2] (row, col) patch coordinates, frame [N] global frame index (the full-attention segment;
  one per image), window [N] global window index.
  """
  m = cfg.spatial_merge_size
  win = cfg.window_size // m // cfg.patch_size  # window side in merged cells
  pos, frame, window = [], [], []
  n_windows = n_frames = 0
  for i, (t, h, w) in enumerate(grids):
    if h % m or w % m:
      raise ValueError(f"image {i}: patch grid {h}x{w} must be divisible by spatial_merge_size {m}")
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    rc = np.stack([block(r), block(c)], -1)
    pos.append(np.tile(rc, (t, 1)))
    frame.append(np.repeat(n_frames + np.arange(t), h * w))
    n_frames += t
    mr, mc = block(r) // m, block(c) // m  # merged cell of every patch
    nwh, nww = -(-(h // m) // win), -(-(w // m) // win)
    wid = (mr // win) * nww + mc // win
    window.append(np.concatenate([wid + n_windows + k * nwh * nww for k in range(t)]))
    n_windows += t * nwh * nww
  return (np.concatenate(pos).astype(np.int32), np.concatenate(frame).astype(np.int32),
          np.concatenate(window).astype(np.int32))


class _VisionBlock(TransformerLayer):
  """One scan step: x [1, N, d] through a block with the full mask when `is_full`, else the window
  mask (both [1, 1, N, N] bool)."""

  def __call__(self, x, is_full, full_mask, window_mask, angles):
    x, _ = super().__call__(x, mask=jnp.where(is_full, full_mask, window_mask), angles=angles)
    return x, None


class VisionTower(nn.Module):
  """patches [N, C*T*P*P] + static grids -> merged image tokens [N / merge_unit, out_hidden_size]."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, patches: jax.Array, grids: tuple[tuple[int, int, int], ...]) -> jax.Array:
    cfg = self.cfg
    tcfg = cfg.trunk()
    n = sum(t * h * w for t, h, w in grids)
    layers.check_shape("vision patches", patches, (n, cfg.patch_dim))
    pos, frame, window = layout(grids, cfg)
    dense = lambda f, axes, bias, name: layers.Dense(f, axes, bias, tcfg.dtype, tcfg.param_dtype,
                                                     name=name)
    x = dense(cfg.hidden_size, (None, "embed"), False, "patch_embed")(patches)[None]  # [1, N, d]
    x = nn.with_logical_constraint(x, layers.ACT_EMBED)
    angles = starflow_2d(cfg.head_dim, cfg.rope_theta, layout="half").angles(jnp.asarray(pos)[None])
    full_mask = jnp.asarray(frame[:, None] == frame[None, :])[None, None]
    window_mask = jnp.asarray(window[:, None] == window[None, :])[None, None]
    is_full = jnp.asarray(np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes))
    blocks = nn.scan(_VisionBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0,) + (nn.broadcast,) * 3, length=cfg.depth,
                     metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
    x, _ = blocks(tcfg, name="blocks")(x, is_full, full_mask, window_mask, angles)
    x = layers.RMSNorm(cfg.norm_eps, dtype=tcfg.dtype, param_dtype=tcfg.param_dtype, name="ln_q")(x)
    x = x.reshape(n // cfg.merge_unit, cfg.merge_unit * cfg.hidden_size)
    x = dense(x.shape[-1], ("embed", "mlp"), True, "merger_fc1")(x)
    x = jax.nn.gelu(x, approximate=False)
    return dense(cfg.out_hidden_size, ("mlp", "embed"), True, "merger_fc2")(x)


def smart_resize(height: int, width: int, factor: int, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """Qwen2-VL's resize rule: both sides multiples of `factor`, area within [min, max] pixels."""
  if max(height, width) / min(height, width) > 200:
    raise UserError(f"image aspect ratio must be below 200, got {height}x{width}")
  h = max(factor, round(height / factor) * factor)
  w = max(factor, round(width / factor) * factor)
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def patchify(image: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
  """Normalised image [H, W, C] float (H, W multiples of patch*merge) -> patches [N, C*T*P*P], grid.

  A still image is repeated over the temporal patch, as the Qwen processor does.
  """
  p, m, tp = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
  hh, ww, c = image.shape
  if hh % (p * m) or ww % (p * m) or c != cfg.in_channels:
    raise UserError(f"image: expected [H, W, {cfg.in_channels}] with H, W multiples of {p * m}, "
                    f"got {image.shape}")
  gh, gw = hh // p, ww // p
  x = np.broadcast_to(image.transpose(2, 0, 1)[None], (tp, c, hh, ww))  # [T, C, H, W]
  x = x.reshape(tp, c, gh // m, m, p, gw // m, m, p)
  x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)  # [gh/m, gw/m, m, m, C, T, P, P]
  return np.ascontiguousarray(x.reshape(gh * gw, c * tp * p * p)), (1, gh, gw)


def preprocess_image(image, cfg: VisionConfig, min_pixels: int = MIN_PIXELS,
                     max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int, int]]:
  """A PIL image (any mode) -> (patches [N, C*T*P*P] float32, patch grid (1, h, w)).

  Resizes with PIL bicubic to the smart_resize size, rescales to [0, 1], CLIP-normalises, patchifies.
  """
  from PIL import Image
  image = image.convert("RGB")
  factor = cfg.patch_size * cfg.spatial_merge_size
  h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
  x = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255.0
  x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
  return patchify(x.astype(np.float32), cfg)
