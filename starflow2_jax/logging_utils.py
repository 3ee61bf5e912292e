"""Logging helpers: TensorBoard scalars (tensorboardX, no TensorFlow), PNG sample grids (via `images`), progress bar.

Everything here writes on process 0 only; other processes get no-op objects.
"""
from __future__ import annotations

import sys
from typing import Mapping

import jax
import numpy as np

from starflow2_jax import images as image_io


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


def write_png_grid(path: str, images: np.ndarray, upscale: int | None = None) -> str | None:
  """Write float [N, H, W, C] images in [-1, 1] as a grid PNG (process 0), enlarged by `upscale`
  (default: `images.grid_upscale`, the rule `launch.sample` follows too). Never overwrites a file."""
  if jax.process_index() != 0:
    return None
  return image_io.save_grid(path, images, upscale=upscale)


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
