"""scikit-learn's handwritten digits (1,797 labelled 8x8 images, shipped in the wheel: no download).

Images are upsampled (bicubic) to `image_size`, quantised to uint8 and replicated to `channels`.
The split is fixed: a seeded permutation of the 1,797 images, the last `NUM_TEST` held out.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from starflow2_jax.errors import UserError

NUM_TEST = 297  # 1,797 = 1,500 train + 297 held-out
SPLIT_SEED = 0  # the permutation that defines the split (never the training seed)
DIGITS_MAX = 16.0  # sklearn digits are integers in [0, 16]


class DigitsSource:
  """Random-access source of {"image": uint8 [S, S, C], "label": int32} records."""

  def __init__(self, split: str = "train", image_size: int = 16, channels: int = 1):
    from sklearn.datasets import load_digits  # local import: only this source needs scikit-learn
    if split not in ("train", "test"):
      raise UserError(f"digits split must be 'train' or 'test', found {split!r}")
    if channels not in (1, 3):
      raise UserError(f"digits: data.channels must be 1 or 3, found {channels}")
    d = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(d.target))
    idx = order[:-NUM_TEST] if split == "train" else order[-NUM_TEST:]
    raw = d.images[idx] / DIGITS_MAX  # [N, 8, 8] in [0, 1]
    imgs = np.stack([np.asarray(Image.fromarray(im.astype(np.float32), mode="F").resize(
        (image_size, image_size), Image.BICUBIC)) for im in raw])
    imgs = np.clip(np.round(imgs * 255.0), 0, 255).astype(np.uint8)[..., None]
    self.images = np.repeat(imgs, channels, axis=-1)
    self.labels = d.target[idx].astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.images[i], "label": self.labels[i]}
