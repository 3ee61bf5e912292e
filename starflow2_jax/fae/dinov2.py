"""DINOv2 (Hugging Face `Dinov2Model` semantics) in functional Linen, and loading a converted checkpoint.

Forward (CHECKPOINT-LAYOUTS.md c.3), pixels float32 [B, H, W, C] already normalised (ImageNet mean/std):
  patches [B, N, C*P*P] in (C, P, P) order -> Dense (the stride-P Conv2d) -> [B, N, d];
  prepend CLS, add the position table [1 + N, d] (stored already resized to this input's grid: the
  converter resizes the published table with `resize_position_table`, torch's bicubic, a = -0.75);
  insert register tokens after CLS (none in the published models); L layers
  x + ls1 * Attn(LN1 x), x + ls2 * MLP(LN2 x) (GELU MLP or SwiGLU, biases everywhere); final LayerNorm.
  last_hidden_state: [B, 1 + R + N, d] in Hugging Face's token order (CLS, registers, patches).

Parameters:
  patch_embed/{kernel [C*P*P, d], bias [d]}   cls_token [d]   register_tokens [R, d] (R > 0 only)
  pos_embed [1 + N, d] (N = the input's patch grid)   layers/stack/... [L, ...] (see fae.vit)
  norm/{scale, bias} [d]

Library: `Dinov2Config`, `Dinov2`, `features(model, params, pixels)`, `load_dinov2(dir)`,
`resize_position_table`, `preprocess` (uint8 or [0, 1] images -> normalised pixels).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from starflow2_jax import ckpt, parallel
from starflow2_jax.errors import UserError, check_known_fields
from starflow2_jax.fae.vit import EncoderStack
from starflow2_jax.nn import layers
from starflow2_jax.nn.attention import TransformerConfig

MODEL_KIND = "dinov2"
# ImageNet normalisation of DINOv2's inputs (CHECKPOINT-LAYOUTS.md c.3).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torch.nn.functional.interpolate(mode="bicubic")'s cubic convolution coefficient.
TORCH_BICUBIC_A = -0.75
SWIGLU_MULTIPLE = 8  # DINOv2's SwiGLU hidden width is rounded up to a multiple of 8
MLP_KINDS = ("gelu", "swiglu")


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """A DINOv2 ViT. `image_size` is the side the published position table was trained at (518 for
  the Hub models: 37 x 37 patches); `input_size` (H, W) the input this instance takes (its position
  table is sized for it); default: (image_size, image_size)."""
  hidden_size: int
  num_layers: int
  num_heads: int
  patch_size: int = 14
  image_size: int = 518
  input_size: tuple[int, int] | None = None
  mlp: str = "gelu"  # gelu (exact) | swiglu
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  layerscale_value: float = 1.0
  qkv_bias: bool = True
  num_registers: int = 0
  num_channels: int = 3
  attention_impl: str | None = None
  remat: str = "none"
  scan_layers: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.mlp not in MLP_KINDS:
      raise UserError(f"dinov2.mlp={self.mlp!r}: expected one of {MLP_KINDS}")
    if self.hidden_size % self.num_heads:
      raise UserError(f"dinov2.hidden_size={self.hidden_size} is not divisible by "
                      f"dinov2.num_heads={self.num_heads}")
    h, w = self.input_hw
    if h % self.patch_size or w % self.patch_size:
      raise UserError(f"dinov2.input_size={(h, w)}: both sides must be multiples of "
                      f"dinov2.patch_size={self.patch_size}")

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict | dict) -> "Dinov2Config":
    d = dict(c.to_dict() if isinstance(c, ml_collections.ConfigDict) else c)
    check_known_fields(cls, "dinov2 config", d)
    if d.get("input_size") is not None:
      d["input_size"] = tuple(int(v) for v in d["input_size"])
    return cls(**d)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["input_size"] = list(self.input_hw)
    return d

  @property
  def input_hw(self) -> tuple[int, int]:
    return tuple(self.input_size) if self.input_size else (self.image_size, self.image_size)

  @property
  def grid(self) -> tuple[int, int]:
    h, w = self.input_hw
    return h // self.patch_size, w // self.patch_size

  @property
  def native_grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """1 + R + N: the length of last_hidden_state."""
    return 1 + self.num_registers + self.grid[0] * self.grid[1]

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    hidden = int(self.hidden_size * self.mlp_ratio)
    if self.mlp == "swiglu":
      return -(-int(hidden * 2 / 3) // SWIGLU_MULTIPLE) * SWIGLU_MULTIPLE
    return hidden

  def trunk(self) -> TransformerConfig:
    return TransformerConfig(
        width=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
        head_dim=self.head_dim, mlp_hidden=self.mlp_hidden, mlp=self.mlp, norm="layernorm",
        norm_eps=self.layer_norm_eps, fused_qkv=False, qkv_bias=self.qkv_bias, out_bias=True,
        mlp_bias=True, attention_impl=self.attention_impl, remat=self.remat,
        scan_layers=self.scan_layers, dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/P)(W/P), C*P*P], each patch flattened in (C, P, P) order (the Conv2d
  weight's input order), patches in raster order."""
  b, h, w, c = pixels.shape
  x = pixels.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def check_pixels(pixels, cfg: Dinov2Config, what: str = "pixels") -> None:
  """UserError unless pixels are [B, H, W, C] with (H, W) = cfg.input_hw and C = cfg.num_channels."""
  h, w = cfg.input_hw
  if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (h, w, cfg.num_channels):
    raise UserError(f"{what}: expected [B, {h}, {w}, {cfg.num_channels}] (dinov2.input_size, "
                    f"num_channels), found {list(pixels.shape)}; resize the images or convert the "
                    f"checkpoint for this size (--config.input_size)")


class Dinov2(nn.Module):
  """pixels [B, H, W, C] (normalised) -> (last_hidden_state [B, 1 + R + N, d], hidden states
  [L, B, 1 + R + N, d] (before the final norm) when `collect_hidden`, else None)."""
  cfg: Dinov2Config

  @nn.compact
  def __call__(self, pixels: jax.Array, collect_hidden: bool = False):
    cfg = self.cfg
    tcfg = cfg.trunk()
    check_pixels(pixels, cfg)
    d = cfg.hidden_size
    b = pixels.shape[0]
    x = layers.Dense(d, (None, "embed"), True, tcfg.dtype, tcfg.param_dtype, name="patch_embed")(
        patchify(pixels.astype(tcfg.dtype), cfg.patch_size))
    gh, gw = cfg.grid
    cls = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                     (d,), tcfg.param_dtype)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               ("length", "embed")),
                     (1 + gh * gw, d), tcfg.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = x + pos.astype(x.dtype)[None]
    if cfg.num_registers:
      reg = self.param("register_tokens", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("length", "embed")), (cfg.num_registers, d), tcfg.param_dtype)
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg.astype(x.dtype), (b, cfg.num_registers, d)),
                           x[:, 1:]], axis=1)
    h, hidden = EncoderStack(tcfg, cfg.layerscale_value, name="layers")(x, collect_hidden=collect_hidden)
    out = layers.LayerNorm(cfg.layer_norm_eps, dtype=tcfg.dtype, param_dtype=tcfg.param_dtype,
                           name="norm")(h)
    return out, hidden


def features(model: Dinov2, params, pixels: jax.Array) -> jax.Array:
  """The final-normed last_hidden_state [B, 1 + R + N, d] (CLS, registers, patches)."""
  return model.apply({"params": params}, pixels)[0]


def patch_features(cfg: Dinov2Config, last_hidden_state: jax.Array) -> jax.Array:
  """last_hidden_state [B, 1 + R + N, d] -> the patch tokens [B, N, d] (what the FAE encodes)."""
  return last_hidden_state[:, 1 + cfg.num_registers:]


def preprocess(images, cfg: Dinov2Config, antialias: bool = True) -> jax.Array:
  """uint8 images [B, h, w, C] (or floats in [0, 1]) -> float32 [B, H, W, C] resized to the model's
  input size (bicubic, antialiased when shrinking; skipped at equal size) and ImageNet-normalised."""
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  h, w = cfg.input_hw
  if tuple(x.shape[1:3]) != (h, w):
    x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bicubic", antialias=antialias)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x - mean) / std


# -- torch-exact bicubic resize of the position table ----------------------------------------------
def _cubic_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float64 matrix of torch's bicubic interpolation (align_corners=False, a = -0.75,
  no antialiasing, border indices clamped), coordinates computed in float32 as torch does."""
  a = np.float32(TORCH_BICUBIC_A)
  scale = np.float32(n_in) / np.float32(n_out)
  src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  base = np.floor(src)
  t = (src - base).astype(np.float32)

  def conv1(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def conv2(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  coeffs = np.stack([conv2(t + 1), conv1(t), conv1(1 - t), conv2(2 - t)], -1).astype(np.float32)
  w = np.zeros((n_out, n_in), np.float64)
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
    np.add.at(w, (np.arange(n_out), idx), coeffs[:, k])
  return w


def resize_position_table(table: np.ndarray, native: int, grid: tuple[int, int],
                          input_hw: tuple[int, int]) -> np.ndarray:
  """A published table [1 + native^2, d] (CLS row, then the native x native patch rows) -> the table
  for an input of `input_hw` pixels with patch grid `grid` [1 + gh*gw, d], exactly as Hugging Face's
  `Dinov2Embeddings.interpolate_pos_encoding`: unchanged when the patch count equals the table's and
  the input is square; otherwise the patch part is bicubically resized (torch semantics, float32)."""
  gh, gw = grid
  n = table.shape[0] - 1
  if n != native * native:
    raise UserError(f"position table: {n} patch rows are not a square of the native grid {native}")
  if gh * gw == n and input_hw[0] == input_hw[1]:
    return np.asarray(table)
  dtype = table.dtype
  patch = np.asarray(table[1:], np.float32).reshape(native, native, -1).astype(np.float64)
  wy, wx = _cubic_weights(native, gh), _cubic_weights(native, gw)
  resized = np.einsum("yi,ijd,xj->yxd", wy, patch, wx).astype(np.float32).reshape(gh * gw, -1)
  return np.concatenate([np.asarray(table[:1], np.float32), resized]).astype(dtype)


# -- loading a converted checkpoint ----------------------------------------------------------------
def config_from_checkpoint(config: ml_collections.ConfigDict, path: str) -> Dinov2Config:
  if config.get("model_kind", None) != MODEL_KIND:
    raise UserError(f"{path}: expected a converted DINOv2 checkpoint (model_kind {MODEL_KIND!r}), "
                    f"found model_kind {config.get('model_kind', None)!r}; convert one with "
                    "python -m launch.convert --from=hf_dinov2")
  return Dinov2Config.from_config(config.model)


def abstract_params(cfg: Dinov2Config):
  """The (logically boxed) abstract parameter tree, from shapes only."""
  h, w = cfg.input_hw
  x = jnp.zeros((1, h, w, cfg.num_channels), jnp.float32)
  return jax.eval_shape(lambda r: Dinov2(cfg).init(r, x)["params"], jax.random.key(0))


def load_dinov2(checkpoint: str, mesh: jax.sharding.Mesh | None = None,
                rules=parallel.DEFAULT_LOGICAL_RULES):
  """A converted checkpoint directory (`launch.convert --from=hf_dinov2`) -> (Dinov2, params,
  Dinov2Config); params placed on `mesh` by the logical rules (None: one device). A file whose
  shapes do not match its config is a UserError naming each parameter and both shapes."""
  cfg = config_from_checkpoint(ckpt.load_config(checkpoint), checkpoint)
  abstract = abstract_params(cfg)
  shardings = parallel.param_shardings(abstract, mesh, rules)
  params = ckpt.load_params(checkpoint, nn.unbox(abstract), shardings)
  return Dinov2(cfg), params, cfg
