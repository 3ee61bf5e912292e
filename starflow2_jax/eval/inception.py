"""The FID InceptionV3 (pytorch-fid's `InceptionV3`, 2048-d final average pool) in Flax, NHWC.

The network is TensorFlow's 2015-12-05 Inception graph as pytorch-fid ports it: torchvision's
InceptionV3 trunk with the FID patches (the average pools of Mixed_5b-d, 6b-e and 7b do not count the
zero padding; Mixed_7c pools with a max, not an average). Every convolution has no bias and is followed
by an inference BatchNorm (eps 1e-3) and a ReLU.

  pixels float32 [B, H, W, 3] RGB in [0, 1], any H, W
    -> bilinear resize to 299 x 299 (PyTorch's `F.interpolate(..., mode="bilinear",
       align_corners=False)`, no antialiasing: explicit interpolation matrices, so it is exact)
    -> 2 x - 1 (scaling to [-1, 1])
    -> trunk (stride-2 stem, 3 x A, B, 4 x C, D, 2 x E) [B, 8, 8, 2048]
    -> spatial mean -> features [B, 2048]

Variables: {"params": {"Conv2d_1a_3x3": {"conv": {"kernel"}, "bn": {"scale", "bias"}}, ...},
"batch_stats": {... {"bn": {"mean", "var"}}}}, with pytorch-fid's module names. All maths in float32 at
the highest matmul precision, so the features do not depend on the accelerator's default precision.

Checkpoints: `python -m launch.convert --from=pytorch_fid_inception` writes one (model_kind
"inception_v3_fid"); `load_inception(dir)` reads it; `pool_features` computes features in batches.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from starflow2_jax import ckpt
from starflow2_jax.errors import UserError

MODEL_KIND = "inception_v3_fid"
FEATURE_DIM = 2048
INPUT_SIZE = 299  # pytorch-fid resizes every input to 299 x 299
BN_EPS = 1e-3  # torchvision BasicConv2d's BatchNorm2d(eps=0.001)
_HIGHEST = jax.lax.Precision.HIGHEST


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's bilinear resize (align_corners=False, no antialias) on one
  axis: source coordinate (i + 0.5) n_in / n_out - 0.5, clamped below at 0, neighbours clamped;
  rounded as torch's CPU kernel rounds (a float32 scale, the coordinate rounded once to float32)."""
  f32 = np.float32
  scale = np.float64(f32(n_in) / f32(n_out))
  src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(f32), f32(0.0))
  i0 = np.minimum(src.astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = (src - i0.astype(f32)).astype(np.float64)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), i1), frac)
  return m.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """[B, H, W, C] -> [B, size, size, C] exactly as torch's bilinear interpolate (float32)."""
  _, h, w, _ = x.shape
  rows, cols = jnp.asarray(bilinear_matrix(h, size)), jnp.asarray(bilinear_matrix(w, size))
  x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=_HIGHEST)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=_HIGHEST)


def _pad(padding) -> tuple[tuple[int, int], tuple[int, int]]:
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return (ph, ph), (pw, pw)


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm (running statistics) -> ReLU; torch's padding (int or (ph, pw))."""
  features: int
  kernel: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x):
    k = (self.kernel, self.kernel) if isinstance(self.kernel, int) else tuple(self.kernel)
    x = nn.Conv(self.features, k, strides=(self.stride, self.stride), padding=_pad(self.padding),
                use_bias=False, precision=_HIGHEST, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x):
  """3x3 stride-1 average pool, zero padding not counted (TensorFlow's, the FID patch)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b-d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 -> 224 + pool_features channels."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, 1, name="branch1x1")(x)
    b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(BasicConv(48, 1, name="branch5x5_1")(x))
    b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
    bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e: factorised 7x7 branches with `c7` inner channels -> 768 channels."""
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = BasicConv(192, 1, name="branch1x1")(x)
    b7 = BasicConv(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, 1, name="branch7x7dbl_1")(x)
    for i, (features, kernel, pad) in enumerate(
        [(c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)), (c7, (7, 1), (3, 0)), (192, (1, 7), (0, 3))], 2):
      bd = BasicConv(features, kernel, padding=pad, name=f"branch7x7dbl_{i}")(bd)
    bp = BasicConv(192, 1, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(BasicConv(192, 1, name="branch3x3_1")(x))
    b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (average pool, padding not counted) and Mixed_7c (`max_pool`: the FID network's max
  pool) -> 2048 channels."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, 1, name="branch1x1")(x)
    b3 = BasicConv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
    bp = BasicConv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """pixels float32 [B, H, W, 3] in [0, 1] -> pool features float32 [B, 2048] (module docstring)."""

  @nn.compact
  def __call__(self, pixels):
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
      raise UserError(f"Inception input must be RGB pixels [B, H, W, 3], found shape {list(pixels.shape)}")
    x = 2.0 * resize_bilinear(pixels.astype(jnp.float32)) - 1.0
    x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_reduce(x)
    x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_reduce(x)
    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool, name=name)(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def abstract_variables() -> dict:
  """Shapes of the network's variables (no compute)."""
  pixels = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda p: InceptionV3().init(jax.random.key(0), p), pixels)


def experiment_config() -> ml_collections.ConfigDict:
  """The config stored with an Inception checkpoint."""
  return ml_collections.ConfigDict({"model_kind": MODEL_KIND, "model": {
      "feature_dim": FEATURE_DIM, "input_size": INPUT_SIZE, "input_range": [0.0, 1.0]}})


def load_inception(checkpoint: str) -> tuple[InceptionV3, dict]:
  """(model, variables) of a converted FID Inception checkpoint directory."""
  config = ckpt.load_config(checkpoint)
  kind = config.get("model_kind", None)
  if kind != MODEL_KIND:
    raise UserError(f"{checkpoint}: expected an Inception checkpoint (model_kind {MODEL_KIND!r}), found "
                    f"model_kind {kind!r}; write one with python -m launch.convert "
                    "--from=pytorch_fid_inception --checkpoint=pt_inception-2015-12-05-6726825d.pth "
                    "--out=DIR")
  return InceptionV3(), ckpt.load_params(checkpoint, abstract_variables())


def feature_fn(model: InceptionV3):
  """The jitted (variables, pixels [B, H, W, 3] in [0, 1]) -> features [B, 2048]."""
  return jax.jit(model.apply)


def pool_features(model: InceptionV3, variables, pixels: np.ndarray, batch_size: int = 50,
                  apply=None) -> np.ndarray:
  """Features float32 [N, 2048] of pixels float32 [N, H, W, 3] in [0, 1] (NHWC, any size) or uint8
  images [N, H, W, 3] (divided by 255), in batches of `batch_size` (the last one padded, so one
  compile). `apply`: a `feature_fn(model)` to reuse across calls."""
  pixels = as_unit_pixels(pixels)
  apply = apply or feature_fn(model)
  out = []
  for start in range(0, len(pixels), batch_size):
    chunk = pixels[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
    out.append(np.asarray(apply(variables, chunk))[:n])
  return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


def as_unit_pixels(pixels: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 / 255; float pixels are checked to lie in [0, 1]."""
  pixels = np.asarray(pixels)
  if pixels.ndim != 4 or pixels.shape[-1] != 3:
    raise UserError(f"Inception input must be RGB [N, H, W, 3] (NHWC), found shape {list(pixels.shape)}")
  if pixels.dtype == np.uint8:
    return pixels.astype(np.float32) / 255.0
  pixels = pixels.astype(np.float32)
  if pixels.size and (pixels.min() < 0.0 or pixels.max() > 1.0):
    raise UserError(f"Inception pixels must be float RGB in [0, 1] (pytorch-fid's input range), found "
                    f"values in [{pixels.min():.4g}, {pixels.max():.4g}]")
  return pixels

