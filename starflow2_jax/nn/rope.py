"""Rotary position embeddings: one mechanism for 1-D RoPE, Qwen M-RoPE and STARFlow's 2-D RoPE.

A `RopeSpec` is a frequency table: frequency f rotates with `positions[..., axis[f]] * inv_freq[f]`.
  * 1-D RoPE:     one axis, inv_freq[f] = base^(-2f/head_dim).
  * M-RoPE (Qwen2.5-VL): axes (t, h, w), the same global inv_freq, frequencies split into sections.
  * STARFlow 2-D: two axes (row, col), each with head_dim/4 frequencies base^(-2j/(head_dim/2)).
Angles have shape [B, T, head_dim/2]. Two channel layouts (CHECKPOINT-LAYOUTS b.4 pitfall 8):
  * "half" (rotate-half, Qwen/HF): pairs (i, i + head_dim/2).
  * "interleaved" (STARFlow): pairs (2i, 2i+1).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Frequency table. inv_freq and axis are tuples (hashable: the spec is a static module field)."""
  inv_freq: tuple[float, ...]
  axis: tuple[int, ...]
  layout: str = "half"

  @property
  def num_axes(self) -> int:
    return max(self.axis) + 1

  def angles(self, positions: jax.Array) -> jax.Array:
    """positions: [B, T, num_axes] (or [B, T] for one axis) -> angles [B, T, F] float32."""
    dtype = jnp.promote_types(positions.dtype, jnp.float32)
    if positions.ndim == 2:
      positions = positions[..., None]
    if positions.shape[-1] != self.num_axes:
      raise ValueError(f"rope positions: expected {self.num_axes} axes, got shape {positions.shape}")
    pos = positions.astype(dtype)[..., np.asarray(self.axis)]
    return pos * jnp.asarray(self.inv_freq, dtype)


def rope_1d(head_dim: int, base: float = 10000.0, layout: str = "half") -> RopeSpec:
  return mrope(head_dim, (head_dim // 2,), base, layout)


def mrope(head_dim: int, sections: Sequence[int], base: float, layout: str = "half") -> RopeSpec:
  """Qwen2.5-VL multimodal RoPE: global frequencies base^(-2f/head_dim), split into axis sections."""
  if sum(sections) != head_dim // 2:
    raise ValueError(f"mrope sections {tuple(sections)} must sum to head_dim/2 = {head_dim // 2}")
  inv = base ** (-2.0 * np.arange(head_dim // 2, dtype=np.float64) / head_dim)
  axis = np.repeat(np.arange(len(sections)), sections)
  return RopeSpec(tuple(float(v) for v in inv), tuple(int(a) for a in axis), layout)


def starflow_2d(head_dim: int, base: float = 10000.0, layout: str = "interleaved") -> RopeSpec:
  """STARFlow's 2-D RoPE: two axes of head_dim/4 frequencies each, base^(-2j/(head_dim/2))."""
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
  n = head_dim // 4
  inv = base ** (-2.0 * np.arange(n, dtype=np.float64) / (2 * n))
  return RopeSpec(tuple(float(v) for v in np.concatenate([inv, inv])), (0,) * n + (1,) * n, layout)


def starflow_grid_positions(h: int, w: int, pt: float | None = None) -> np.ndarray:
  """Normalised 2-D positions of an h x w raster grid: (r*pt/sqrt(hw), c*pt/sqrt(hw)). -> [h*w, 2].

  pt defaults to sqrt(h*w) (the training grid side), which makes square-grid positions integers.
  """
  pt = float(np.sqrt(h * w)) if pt is None else float(pt)
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  scale = pt / np.sqrt(h * w)
  return np.stack([r.reshape(-1) * scale, c.reshape(-1) * scale], -1)


def apply_rope(x: jax.Array, angles: jax.Array, layout: str) -> jax.Array:
  """Rotate x: [B, T, H, Dh] by angles [B, T, Dh/2] (broadcast over heads). Computed in float32."""
  dtype = x.dtype
  cdt = jnp.promote_types(dtype, jnp.float32)
  cos = jnp.cos(angles)[:, :, None, :].astype(cdt)
  sin = jnp.sin(angles)[:, :, None, :].astype(cdt)
  x = x.astype(cdt)
  if layout == "half":
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  elif layout == "interleaved":
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(x.shape)
  else:
    raise ValueError(f"rope layout must be 'half' or 'interleaved', got {layout!r}")
  return out.astype(dtype)


def starflow_3d(head_dim: int, base: float = 10000.0, layout: str = "interleaved") -> RopeSpec:
  """STARFlow's 3-axis RoPE (image x, image y, text/frame axis), used with a causal text prefix.

  For head_dim 64: x and y get 12 frequencies each, base^(-2j/24); the third axis 8, base^(-j/8).
  In general x/y get 3*head_dim/16 each and the third axis head_dim/8 (STARFLOW2.md 2.8).
  """
  if head_dim % 16:
    raise ValueError(f"3-D RoPE needs head_dim divisible by 16, got {head_dim}")
  nxy, nt = 3 * head_dim // 16, head_dim // 8
  inv_xy = base ** (-2.0 * np.arange(nxy, dtype=np.float64) / (2 * nxy))
  inv_t = base ** (-np.arange(nt, dtype=np.float64) / nt)
  inv = np.concatenate([inv_xy, inv_xy, inv_t])
  return RopeSpec(tuple(float(v) for v in inv), (0,) * nxy + (1,) * nxy + (2,) * nt, layout)
