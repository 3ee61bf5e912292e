"""Image helpers: [-1, 1] float images -> uint8, grids, PNG files (never overwriting)."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

# A grid cell's side in pixels that a person can read: cells smaller than this are enlarged by the
# largest whole factor that keeps them within it (16x16 digits -> 128 px; 256x256 photos stay as they are).
READABLE_CELL_PX = 128


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[..., H, W, C] floats in [-1, 1] -> uint8 (clipped, rounded)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] uint8 grid."""
  n, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
  return grid


def save_png(path: str, image: np.ndarray, upscale: int = 1, overwrite: bool = False) -> str:
  """Write an [H, W, C] uint8 image (C = 1 or 3) as PNG, optionally enlarged `upscale` times
  (nearest neighbour). Creates the parent directory; refuses to overwrite unless asked."""
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; refusing to overwrite it")
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  img.save(path)
  return path


def grid_upscale(height: int, width: int) -> int:
  """The one enlargement rule for image grids: max(1, READABLE_CELL_PX // max(H, W)), so a cell of
  side <= READABLE_CELL_PX / 2 ends between READABLE_CELL_PX / 2 and READABLE_CELL_PX pixels."""
  return max(1, READABLE_CELL_PX // max(height, width))


def save_grid(path: str, images: np.ndarray, cols: int | None = None, upscale: int | None = None,
              overwrite: bool = False) -> str:
  """[N, H, W, C] floats in [-1, 1] -> a PNG grid at `path`, enlarged `upscale` times (nearest
  neighbour; default `grid_upscale(H, W)`)."""
  upscale = grid_upscale(*images.shape[1:3]) if upscale is None else upscale
  return save_png(path, make_grid(to_uint8(images), cols), upscale, overwrite)
