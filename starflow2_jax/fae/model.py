"""The FAE (arXiv 2512.07829; STARFLOW2.md section 6): DINOv2 trunk -> encoder head -> latent ->
feature decoder -> DINOv2 feature space -> pixel decoder -> RGB.

Shapes (B images, N = h*w patch tokens of the trunk's grid, D = trunk width, C = latent channels):
  images uint8 [B, S, S, 3] -> trunk pixels [B, H, W, 3] (resized to dinov2.input_size, normalised)
  -> patch features x [B, N, D] (final-normed last_hidden_state without CLS / registers)
  -> EncoderHead: x + Attn(LN x), then LN, Linear D -> 2C: posterior mean, logvar [B, N, C]
  -> FeatureDecoder: Linear C -> W, layers (RMSNorm, SwiGLU, 2-D axial RoPE), RMSNorm, Linear W -> D
  -> PixelDecoder: Linear D -> W + learned positions [N, W], ViT layers (LayerNorm, GELU), LayerNorm,
     Linear W -> p*p*3, unpatchified in (p1, p2, c) order: [B, S, S, 3] in [-1, 1].

Parameters: {"trunk", "head", "feature_decoder", "pixel_decoder", "latent_stats": {"mean", "std"} [C]}.

`FAE(config)` is a static, hashable object (close over it in jit); every method takes the params
pytree as an argument and is jittable. Shape and key mistakes are UserErrors raised while tracing.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from starflow2_jax.errors import UserError
from starflow2_jax.fae import dinov2 as dinov2_lib
from starflow2_jax.fae.config import PARTS, STATS, FAEConfig, StackConfig
from starflow2_jax.fae.vit import EncoderStack
from starflow2_jax.nn import layers
from starflow2_jax.nn.attention import Attention, TransformerConfig
from starflow2_jax.nn.rope import starflow_2d

HEAD_NORM_EPS = 1e-6  # the head's LayerNorms (DINOv2's eps)
UINT8_MAX = 255.0


def _stack_config(s: StackConfig, cfg: FAEConfig, *, norm: str, mlp: str, bias: bool,
                  rope: bool) -> TransformerConfig:
  return TransformerConfig(
      width=s.width, num_layers=s.layers, num_heads=s.heads, head_dim=s.head_dim, mlp_hidden=s.mlp_hidden,
      mlp=mlp, norm=norm, norm_eps=s.norm_eps, fused_qkv=True, qkv_bias=bias, out_bias=bias,
      mlp_bias=bias, rope_layout="half" if rope else None, attention_impl=cfg.attention_impl,
      remat=cfg.remat, dtype=jnp.dtype(cfg.dtype))


class EncoderHead(nn.Module):
  """x [B, N, D] -> (mean, logvar) [B, N, C], float32. One pre-norm self-attention sublayer (no MLP,
  no positions: the DINOv2 features carry them), then LayerNorm and Linear D -> 2C; the log-variance
  half is offset by `fae.logvar_offset` (where the posterior variance starts)."""
  cfg: FAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    d = x.shape[-1]
    tcfg = TransformerConfig(width=d, num_layers=1, num_heads=cfg.head_heads, head_dim=cfg.head_dim,
                             norm="layernorm", norm_eps=HEAD_NORM_EPS, fused_qkv=True,
                             attention_impl=cfg.attention_impl, dtype=jnp.dtype(cfg.dtype))
    norm = lambda name: layers.LayerNorm(HEAD_NORM_EPS, dtype=tcfg.dtype, name=name)
    a, _ = Attention(tcfg, name="attn")(norm("norm1")(x), mask=None)
    h = x.astype(tcfg.dtype) + a
    out = layers.Dense(2 * cfg.latent_channels, ("embed", "latent"), True, jnp.float32, name="proj")(
        norm("norm2")(h).astype(jnp.float32))
    mean, logvar = jnp.split(out, 2, axis=-1)
    return mean, logvar + cfg.logvar_offset


def grid_angles(s: StackConfig, grid: tuple[int, int]) -> jax.Array:
  """2-D axial RoPE angles [1, h*w, head_dim/2] of the raster grid (row, col), rotate-half layout."""
  r, c = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  pos = np.stack([r.reshape(-1), c.reshape(-1)], -1).astype(np.float32)[None]
  return starflow_2d(s.head_dim, s.rope_base, layout="half").angles(jnp.asarray(pos))


class FeatureDecoder(nn.Module):
  """z [B, N, C] -> reconstructed features [B, N, D] (float32)."""
  cfg: FAEConfig
  out_dim: int

  @nn.compact
  def __call__(self, z):
    cfg, s = self.cfg, self.cfg.decoder
    tcfg = _stack_config(s, cfg, norm="rmsnorm", mlp="swiglu", bias=False, rope=True)
    h = layers.Dense(s.width, ("latent", "embed"), True, tcfg.dtype, name="embed")(z)
    h, _ = EncoderStack(tcfg, name="layers")(h, grid_angles(s, cfg.grid))
    h = layers.RMSNorm(s.norm_eps, dtype=tcfg.dtype, name="norm")(h)
    return layers.Dense(self.out_dim, ("embed", "mlp"), True, jnp.float32, name="out")(
        h.astype(jnp.float32))


class PixelDecoder(nn.Module):
  """features [B, N, D] -> images [B, S, S, 3] in about [-1, 1] (float32, not clipped)."""
  cfg: FAEConfig

  @nn.compact
  def __call__(self, x):
    cfg, s = self.cfg, self.cfg.pixel
    tcfg = _stack_config(s, cfg, norm="layernorm", mlp="gelu", bias=True, rope=False)
    n, p = cfg.num_latents, cfg.pixel_patch
    h = layers.Dense(s.width, ("mlp", "embed"), True, tcfg.dtype, name="embed")(x)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               ("length", "embed")), (n, s.width))
    h, _ = EncoderStack(tcfg, name="layers")(h + pos.astype(h.dtype)[None])
    h = layers.LayerNorm(s.norm_eps, dtype=tcfg.dtype, name="norm")(h)
    out = layers.Dense(p * p * 3, ("embed", None), True, jnp.float32, name="out")(h.astype(jnp.float32))
    return unpatchify(out, cfg.grid, p)


def unpatchify(tokens: jax.Array, grid: tuple[int, int], p: int) -> jax.Array:
  """[B, h*w, p*p*3] in (p1, p2, c) order -> [B, h*p, w*p, 3]."""
  b = tokens.shape[0]
  gh, gw = grid
  x = tokens.reshape(b, gh, gw, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, 3)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per element: 0.5 (mean^2 + exp(logvar) - 1 - logvar)."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def reparameterise(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """A posterior sample mean + exp(logvar / 2) * eps, eps ~ N(0, 1) (what FAE training decodes)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def token_noise(rng: jax.Array, x: jax.Array, sigma: float) -> jax.Array:
  """Phase-A pixel-decoder input x + sigma * rms(x_n) * eps, rms over each token's channels."""
  rms = jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True))
  return x + sigma * rms * jax.random.normal(rng, x.shape, x.dtype)


class FAE:
  """The FAE as a static object. Attributes: grid (h, w), channels C, image_size S, config (the
  `config.fae` ConfigDict), spec (the FAEConfig). Hashable by its spec."""

  def __init__(self, config: ml_collections.ConfigDict | FAEConfig):
    if isinstance(config, FAEConfig):
      self.spec = config
      self.config = None
    else:
      self.spec = FAEConfig.from_config(config)
      self.config = config
    s = self.spec
    self.grid, self.channels, self.image_size = s.grid, s.latent_channels, s.image_size
    self.trunk_model = dinov2_lib.Dinov2(s.dinov2)
    self.modules = {"head": EncoderHead(s), "feature_decoder": FeatureDecoder(s, s.dinov2.hidden_size),
                    "pixel_decoder": PixelDecoder(s)}
    self._init_jit = jax.jit(self._init_parts)

  def __hash__(self):
    return hash(self.spec)

  def __eq__(self, other):
    return isinstance(other, FAE) and other.spec == self.spec

  # -- parameters ----------------------------------------------------------------------------------
  def init_part(self, part: str, rng: jax.Array):
    """The logically boxed parameters of one part (PARTS)."""
    s = self.spec
    n, d = s.num_latents, s.dinov2.hidden_size
    h, w = s.dinov2.input_hw
    if part == "trunk":
      return self.trunk_model.init(rng, jnp.zeros((1, h, w, s.dinov2.num_channels)))["params"]
    example = {"head": jnp.zeros((1, n, d)), "feature_decoder": jnp.zeros((1, n, s.latent_channels)),
               "pixel_decoder": jnp.zeros((1, n, d))}[part]
    return self.modules[part].init(rng, example)["params"]

  def init(self, rng: jax.Array, *, with_stats: bool = False, boxed: bool = False):
    """The whole tree {trunk, head, feature_decoder, pixel_decoder} (+ latent_stats = identity
    statistics (mean 0, std 1) when `with_stats`). boxed: keep the logical-partitioning metadata."""
    params = self._init_jit(rng)
    if with_stats:
      params[STATS] = self.identity_stats(boxed)
    return params if boxed else nn.unbox(params)

  def _init_parts(self, rng: jax.Array):
    return {p: self.init_part(p, jax.random.fold_in(rng, i)) for i, p in enumerate(PARTS)}

  def identity_stats(self, boxed: bool = False):
    c = self.channels
    stats = {"mean": jnp.zeros((c,), jnp.float32), "std": jnp.ones((c,), jnp.float32)}
    if boxed:
      return {k: nn.Partitioned(v, names=("latent",)) for k, v in stats.items()}
    return stats

  def abstract_params(self, with_stats: bool = True):
    """Boxed ShapeDtypeStructs of the whole tree (shapes only: jax.eval_shape)."""
    params = jax.eval_shape(self._init_parts, jax.random.key(0))
    if with_stats:
      params[STATS] = jax.eval_shape(lambda: self.identity_stats(boxed=True))
    return params

  # -- the pieces (params = the whole tree; each uses only its part) --------------------------------
  def check_images(self, images) -> None:
    s = self.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
      raise UserError(f"FAE images: expected [B, {s}, {s}, 3] (fae.image_size={s}, RGB), found "
                      f"{list(images.shape)}; resize the images to {s}x{s} RGB")

  def trunk_features(self, trunk_params, images) -> jax.Array:
    """uint8 (or [0, 1] float) images [B, S, S, 3] -> DINOv2 patch features [B, N, D]."""
    self.check_images(images)
    pixels = dinov2_lib.preprocess(images, self.spec.dinov2)
    out = dinov2_lib.features(self.trunk_model, trunk_params, pixels)
    return dinov2_lib.patch_features(self.spec.dinov2, out).astype(jnp.float32)

  def posterior(self, params, features) -> tuple[jax.Array, jax.Array]:
    """features [B, N, D] -> (mean, logvar) [B, N, C] (raw, not normalised)."""
    return self.modules["head"].apply({"params": params["head"]}, features)

  def decode_features(self, params, z) -> jax.Array:
    """raw latents [B, N, C] -> reconstructed features [B, N, D]."""
    return self.modules["feature_decoder"].apply({"params": params["feature_decoder"]}, z)

  def render(self, params, features) -> jax.Array:
    """features [B, N, D] -> images [B, S, S, 3] in about [-1, 1]."""
    return self.modules["pixel_decoder"].apply({"params": params["pixel_decoder"]}, features)

  # -- the API STARFlow2 uses -----------------------------------------------------------------------
  def _stats(self, params):
    if STATS not in params:
      raise UserError("this FAE has no latent statistics (params['latent_stats']) yet: they are "
                      "computed when `launch.train` with model_kind 'fae' finishes and exports; load "
                      "the exported checkpoint (fae.load_fae(WORKDIR/params_<step>)) or call "
                      "fae.stats.compute_latent_stats")
    stats = params[STATS]
    c = self.channels
    for k in ("mean", "std"):
      if tuple(stats[k].shape) != (c,):
        raise UserError(f"params['latent_stats'][{k!r}]: expected shape [{c}] (fae.latent_channels), "
                        f"found {list(stats[k].shape)}")
    return stats["mean"].astype(jnp.float32), stats["std"].astype(jnp.float32)

  def normalise(self, params, z):
    mean, std = self._stats(params)
    return (z - mean) / std

  def denormalise(self, params, x):
    mean, std = self._stats(params)
    return x * std + mean

  def encode(self, params, images) -> jax.Array:
    """uint8 images [B, S, S, 3] -> normalised posterior-mean latents float32 [B, h, w, C]."""
    self._stats(params)
    mean, _ = self.posterior(params, self.trunk_features(params["trunk"], images))
    return self.normalise(params, mean).reshape(images.shape[0], *self.grid, self.channels)

  def decode(self, params, latents) -> jax.Array:
    """normalised latents [B, h, w, C] -> images float32 [B, S, S, 3] in [0, 1]."""
    gh, gw = self.grid
    if latents.ndim != 4 or tuple(latents.shape[1:]) != (gh, gw, self.channels):
      raise UserError(f"FAE latents: expected [B, {gh}, {gw}, {self.channels}], found "
                      f"{list(latents.shape)}")
    z = self.denormalise(params, latents.astype(jnp.float32)).reshape(latents.shape[0], gh * gw, -1)
    images = self.render(params, self.decode_features(params, z))
    return jnp.clip((images + 1.0) * 0.5, 0.0, 1.0)
