"""Images <-> token sequences, in the two channel layouts of the references (STARFLOW2.md 2.1).

Tokens are in raster order over the (H/p) x (W/p) patch grid.
  * "tarflow" (c, p1, p2): channel index c*p^2 + i*p + j (PyTorch `unfold` order).
  * "starflow" (p1, p2, c): channel index (i*p + j)*C + c.
"""
from __future__ import annotations

import einops
import jax

LAYOUTS = {
    "tarflow": "b (h p1) (w p2) c -> b (h w) (c p1 p2)",
    "starflow": "b (h p1) (w p2) c -> b (h w) (p1 p2 c)",
}
_INVERSE = {
    "tarflow": "b (h w) (c p1 p2) -> b (h p1) (w p2) c",
    "starflow": "b (h w) (p1 p2 c) -> b (h p1) (w p2) c",
}


def _check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")


def patchify(x: jax.Array, patch: int, layout: str) -> jax.Array:
  """x: [B, H, W, C] -> tokens [B, (H/p)(W/p), C p^2]."""
  _check_layout(layout)
  if x.ndim != 4:
    raise ValueError(f"patchify expects images [B, H, W, C], got shape {tuple(x.shape)}")
  _, h, w, _ = x.shape
  if h % patch or w % patch:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
  return einops.rearrange(x, LAYOUTS[layout], p1=patch, p2=patch)


def unpatchify(tokens: jax.Array, patch: int, layout: str, image_shape: tuple[int, int, int]):
  """tokens [B, T, D] -> images [B, H, W, C] with image_shape = (H, W, C)."""
  _check_layout(layout)
  h, w, c = image_shape
  expected = ((h // patch) * (w // patch), c * patch * patch)
  if tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
    raise ValueError(f"unpatchify: tokens for {h}x{w}x{c} images with patch {patch} must have shape "
                     f"[B, {expected[0]}, {expected[1]}], got {tuple(tokens.shape)}")
  return einops.rearrange(tokens, _INVERSE[layout], h=h // patch, p1=patch, p2=patch, c=c)


def image_tokens(cfg, images: jax.Array) -> jax.Array:
  """Images [B, H, W, C] of the model `cfg` (a FlowConfig; checked) -> tokens in its layout."""
  cfg.check_images(images)
  return patchify(images, cfg.patch_size, cfg.layout)


def token_images(cfg, tokens: jax.Array) -> jax.Array:
  """Tokens in the model's layout -> images [B, H, W, C]."""
  return unpatchify(tokens, cfg.patch_size, cfg.layout, cfg.image_shape)
