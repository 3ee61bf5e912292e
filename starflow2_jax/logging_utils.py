"""Logging helpers: TensorBoard scalars (tensorboardX, no TensorFlow), PNG sample grids, progress bar.

Everything here writes on process 0 only; other processes get no-op objects.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Mapping

import jax
import numpy as np
from PIL import Image


class MetricWriter:
  """Scalars to TensorBoard event files under `logdir` (process 0 only)."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # local import: only process 0 writes
      self._writer = SummaryWriter(logdir)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is not None:
      for k, v in values.items():
        self._writer.add_scalar(k, float(v), step)
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] grid image."""
  n, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
  return grid


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float images in [-1, 1] -> uint8 [0, 255] (clipped)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_png_grid(path: str, images: np.ndarray, upscale: int = 1) -> str | None:
  """Write uint8 [N, H, W, C] images as a grid PNG (process 0). Refuses to overwrite a file."""
  if jax.process_index() != 0:
    return None
  if os.path.exists(path):
    raise FileExistsError(f"refusing to overwrite {path}")
  grid = image_grid(images)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  img = Image.fromarray(grid)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  img.save(path)
  return path


class Progress:
  """A tqdm progress bar with ETA in interactive runs on process 0; silent otherwise."""

  def __init__(self, total: int, initial: int):
    self._bar = None
    if jax.process_index() == 0 and sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def update(self, n: int = 1, **postfix) -> None:
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
