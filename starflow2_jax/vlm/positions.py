"""M-RoPE position ids: our port of Hugging Face `Qwen2_5_VLModel.get_rope_index` (STARFLOW2.md §4.3).

Text tokens get running 1-D positions on the three axes (t, h, w). An image span is a maximal run of
`<|image_pad|>` ids; with a language-model grid of H_g x W_g tokens (raster order) and s the position the
first image token would get as text, token (r, c) gets (s, s + r, s + c), and the text after the span
resumes at s + max(H_g, W_g). Option mode="1d": token n gets s + n on all axes, text resumes at s + N.
Pads (valid = False) get position 0 and are not counted. Host-side NumPy: spans are data-dependent.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def mrope_positions(tokens: np.ndarray, valid: np.ndarray | None,
                    image_grids: Sequence[tuple[int, int]], image_token_id: int,
                    mode: str = "mrope") -> tuple[np.ndarray, np.ndarray]:
  """tokens [B, L] int, valid [B, L] bool (None = all valid), image_grids: the (H_g, W_g) language-model
  grid of every image span, in order of appearance (row by row) -> (positions [B, L, 3] int32,
  next_position [B] int32: the position of the first token after the sequence)."""
  if mode not in ("mrope", "1d"):
    raise ValueError(f"image position mode must be 'mrope' or '1d', got {mode!r}")
  tokens = np.asarray(tokens)
  b, length = tokens.shape
  valid = np.ones((b, length), bool) if valid is None else np.asarray(valid, bool)
  positions = np.zeros((b, length, 3), np.int64)
  next_pos = np.zeros((b,), np.int64)
  grids = list(image_grids)
  used = 0
  for row in range(b):
    idx = np.nonzero(valid[row])[0]
    ids = tokens[row, idx]
    is_img = ids == image_token_id
    out = np.zeros((len(ids), 3), np.int64)
    cur, i = 0, 0
    while i < len(ids):
      j = i
      while j < len(ids) and is_img[j] == is_img[i]:
        j += 1
      n = j - i
      if not is_img[i]:
        out[i:j] = (cur + np.arange(n))[:, None]
        cur += n
      else:
        if used >= len(grids):
          raise ValueError(f"row {row}: image span {used} at token {idx[i]} has no grid: "
                           f"{len(grids)} image grid(s) given")
        gh, gw = grids[used]
        used += 1
        if gh * gw != n:
          raise ValueError(f"row {row}: image span at token {idx[i]} has {n} image tokens, but its grid "
                           f"{gh}x{gw} needs {gh * gw}")
        if mode == "1d":
          out[i:j] = (cur + np.arange(n))[:, None]
          cur += n
        else:
          r, c = np.divmod(np.arange(n), gw)
          out[i:j] = np.stack([np.full(n, cur), cur + r, cur + c], -1)
          cur += max(gh, gw)
      i = j
    positions[row, idx] = out
    next_pos[row] = cur
  if used != len(grids):
    raise ValueError(f"{len(grids)} image grid(s) given, but the tokens hold {used} image span(s)")
  return positions.astype(np.int32), next_pos.astype(np.int32)
