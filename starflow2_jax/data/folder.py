"""A local folder of images with captions.

DIR/captions.jsonl holds one JSON object per line: {"image": "relative/path.png", "caption": "...",
"label": 3}; "caption" and "label" are optional. Every image must already be `image_size` square (no
silent resizing: a wrong size is an error naming the file).
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from starflow2_jax.errors import UserError

INDEX_FILE = "captions.jsonl"


class FolderSource:
  """Random-access source of {"image": uint8 [S, S, C], "label": int32, "caption": str} records."""

  def __init__(self, directory: str, image_size: int, channels: int = 3, index_file: str = INDEX_FILE):
    self.dir = os.path.abspath(os.path.expanduser(directory))
    path = os.path.join(self.dir, index_file)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.dir={directory}: expected an index file {path} with one JSON object "
                              'per line, e.g. {"image": "img/0001.png", "caption": "a red circle"}')
    self.entries = []
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        e = json.loads(line)
        if "image" not in e:
          raise UserError(f"{path}:{n}: entry has no \"image\" field: {line.strip()[:200]}")
        self.entries.append(e)
    if not self.entries:
      raise UserError(f"{path} lists no images")
    self.image_size, self.channels = image_size, channels

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, i: int) -> dict:
    e = self.entries[i]
    path = os.path.join(self.dir, e["image"])
    with Image.open(path) as im:
      im = im.convert("L" if self.channels == 1 else "RGB")
      if im.size != (self.image_size, self.image_size):
        raise UserError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected "
                        f"{self.image_size}x{self.image_size} (data.image_size); resize the folder first")
      img = np.asarray(im, dtype=np.uint8)
    if img.ndim == 2:
      img = img[..., None]
    return {"image": img, "label": np.int32(e.get("label", -1)), "caption": e.get("caption", "")}
