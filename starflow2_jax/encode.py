"""Encode images with a DINOv2, an FAE or an FID Inception checkpoint: the library behind `launch.encode`.

  python -m launch.encode --checkpoint=DIR (--images=FILES_OR_DIR | --pixels=X.npy) --out=DIR

A DINOv2 checkpoint (`launch.convert --from=hf_dinov2`) writes OUT/features.npy: float32
[N, tokens, width], the final-normed last_hidden_state in Hugging Face's token order (CLS, registers,
patches). An FAE checkpoint (`launch.train` with model_kind fae: WORKDIR/params_<step>) writes
OUT/latents.npy (float32 [N, h, w, C], the normalised posterior means) and OUT/reconstructions.png
(each original next to its reconstruction). An FID Inception checkpoint (`launch.convert
--from=pytorch_fid_inception`) writes OUT/features.npy: float32 [N, 2048], the pool features.

--images: image files, comma-separated, or a directory (its .png/.jpg/.jpeg/.bmp/.webp files, sorted);
  each is converted to RGB, centre-cropped to a square and resized (PIL bicubic) to the model's input:
  DINOv2's input_size, then ImageNet-normalised; the FAE's image_size.
--pixels: an .npy of float32 [N, H, W, 3] already as the model takes it: DINOv2 normalised pixels at
  its input_size; FAE images in [0, 1] at its image_size (the features are a function of it alone);
  Inception: RGB in [0, 1] of any size (pytorch-fid's input, NHWC; the network resizes to 299 and scales
  to [-1, 1] itself). Inception reads --images at their own size (files of one size per run), as [0, 1].
Existing outputs are never overwritten.
"""
from __future__ import annotations

import os

import numpy as np

from starflow2_jax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_paths(spec: str) -> list[str]:
  """--images: a directory (its image files, sorted) or comma-separated files."""
  if os.path.isdir(spec):
    paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
      raise UserError(f"--images={spec}: the directory holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    return paths
  paths = [p for p in spec.split(",") if p]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing or not paths:
    raise FileNotFoundError(f"--images={spec}: no such file(s) {missing}; pass files or a directory")
  return paths


def read_images(paths: list[str], height: int, width: int) -> np.ndarray:
  """uint8 [N, height, width, 3]: RGB, centre-cropped to a square, resized with PIL bicubic."""
  from PIL import Image
  out = []
  for p in paths:
    with Image.open(p) as im:
      im = im.convert("RGB")
      side = min(im.size)
      left, top = (im.width - side) // 2, (im.height - side) // 2
      im = im.crop((left, top, left + side, top + side)).resize((width, height), Image.BICUBIC)
      out.append(np.asarray(im, np.uint8))
  return np.stack(out)


def read_native_images(paths: list[str]) -> np.ndarray:
  """uint8 [N, H, W, 3]: RGB at the files' own size, which must be one size."""
  from PIL import Image
  out = []
  for p in paths:
    with Image.open(p) as im:
      out.append(np.asarray(im.convert("RGB"), np.uint8))
  sizes = sorted({a.shape[:2] for a in out})
  if len(sizes) > 1:
    raise UserError(f"--images: the files have several sizes {sizes[:4]}; encode one size per run")
  return np.stack(out)


def read_pixels(path: str, shape: tuple[int | None, int | None, int], what: str) -> np.ndarray:
  """float32 [N, *shape] from an .npy (None in `shape`: any size on that axis)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--pixels={path}: no such file")
  x = np.load(path)
  if (x.ndim != 4 or any(e is not None and e != f for e, f in zip(shape, x.shape[1:]))
      or x.dtype != np.float32):
    dims = ", ".join("any" if e is None else str(e) for e in shape)
    raise UserError(f"--pixels={path}: expected float32 [N, {dims}] ({what}), "
                    f"found {x.dtype} {list(x.shape)}")
  return x


def _batched(fn, params, x: np.ndarray, batch_size: int) -> np.ndarray:
  return np.concatenate([np.asarray(fn(params, x[i:i + batch_size]))
                         for i in range(0, len(x), batch_size)])


def _new_outputs(out: str, names: tuple[str, ...]) -> list[str]:
  paths = [os.path.join(os.path.abspath(os.path.expanduser(out)), n) for n in names]
  existing = [p for p in paths if os.path.exists(p)]
  if existing:
    raise FileExistsError(f"refusing to overwrite {existing}: choose a new --out")
  os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
  return paths


def encode(checkpoint: str, out: str, images: str | None = None, pixels: str | None = None,
           batch_size: int = 16) -> list[str]:
  """The command, as a function: returns the paths it wrote."""
  import jax

  from starflow2_jax import ckpt, images as image_io
  from starflow2_jax.eval import inception
  from starflow2_jax.fae import dinov2 as dinov2_lib, load_dinov2, load_fae
  if (images is None) == (pixels is None):
    raise UserError("pass exactly one of --images (image files or a directory) and --pixels (.npy)")
  if batch_size < 1:
    raise UserError(f"--batch_size must be >= 1, found {batch_size}")
  kind = ckpt.load_config(checkpoint).get("model_kind", None)
  if kind == dinov2_lib.MODEL_KIND:
    (path,) = _new_outputs(out, ("features.npy",))
    model, params, cfg = load_dinov2(checkpoint)
    h, w = cfg.input_hw
    if pixels is not None:
      x = read_pixels(pixels, (h, w, cfg.num_channels), "ImageNet-normalised pixels at dinov2.input_size")
    else:
      x = np.asarray(dinov2_lib.preprocess(read_images(image_paths(images), h, w), cfg))
    fn = jax.jit(lambda p, b: dinov2_lib.features(model, p, b))
    np.save(path, _batched(fn, params, x, batch_size).astype(np.float32))
    return [path]
  if kind == "fae":
    latents_path, png = _new_outputs(out, ("latents.npy", "reconstructions.png"))
    fae, params = load_fae(checkpoint)
    s = fae.image_size
    if pixels is not None:
      x = read_pixels(pixels, (s, s, 3), "images in [0, 1] at fae.image_size")
    else:
      x = read_images(image_paths(images), s, s)
    latents = _batched(jax.jit(fae.encode), params, x, batch_size)
    recon = _batched(jax.jit(fae.decode), params, latents, batch_size)
    np.save(latents_path, latents.astype(np.float32))
    originals = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x
    pairs = np.stack([originals, recon], 1).reshape(-1, s, s, 3)
    image_io.save_grid(png, pairs * 2.0 - 1.0, cols=2)
    return [latents_path, png]
  if kind == inception.MODEL_KIND:
    (path,) = _new_outputs(out, ("features.npy",))
    model, variables = inception.load_inception(checkpoint)
    if pixels is not None:
      x = read_pixels(pixels, (None, None, 3), "RGB in [0, 1], any size")
    else:
      x = read_native_images(image_paths(images))
    np.save(path, inception.pool_features(model, variables, x, batch_size).astype(np.float32))
    return [path]
  raise UserError(f"--checkpoint={checkpoint}: model_kind {kind!r} is none of a DINOv2 ('dinov2', from "
                  "launch.convert --from=hf_dinov2), an FAE ('fae', from launch.train) and an FID "
                  f"Inception ({inception.MODEL_KIND!r}, from launch.convert --from=pytorch_fid_inception)")
