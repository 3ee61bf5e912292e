"""The Qwen2.5-VL language model (and its optional vision tower) in functional Linen.

Parameters (names as stored in converted checkpoints; the L decoder layers are stacked on a leading
layer axis, logical name "layers", and applied with a scan):
  embed_tokens/embedding [V, d]                       ("vocab", "embed")
  layers/stack/{norm1,norm2}/scale [L, d]
  layers/stack/attn/{q,k,v}/{kernel,bias}             q: [L, d, H*Dh], k/v: [L, d, Hkv*Dh]
  layers/stack/attn/out/kernel [L, H*Dh, d]           no bias
  layers/stack/mlp/{gate,up,down}/kernel              SwiGLU, no biases: [L, d, F], [L, F, d]
  norm/scale [d]                                      final RMSNorm
  lm_head/kernel [d, V]                               absent when the embeddings are tied
  visual/...                                          see vision.py (when the config has a vision tower)

Positions are M-RoPE ids [B, T, 3] (t, h, w) from `positions.mrope_positions`; text tokens carry the
same id on the three axes. The KV cache is the explicit `nn.KVCache` pytree: a call with T tokens writes
them at the cache index, so prefill and decode are the same call.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from starflow2_jax.errors import UserError, check_known_fields
from starflow2_jax.nn import layers
from starflow2_jax.nn.attention import KVCache, Transformer, TransformerConfig
from starflow2_jax.nn.rope import mrope
from starflow2_jax.vlm.vision import VisionConfig, VisionTower

# config.model fields that describe the tokenizer and prompt layout, not the network (read by chat).
TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "bos_token_id", "eos_token_id", "pad_token_id", "image_positions")


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Static model description, built from `config.model` (an ml_collections ConfigDict)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  mrope_section: tuple[int, ...] = (16, 24, 24)
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 128000
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # rematerialisation inside the layer scan: none | dots_saveable | full
  scan_layers: bool = True  # False: the layer scan fully unrolled (same parameters)
  vision: VisionConfig | None = None

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def trunk(self) -> TransformerConfig:
    return TransformerConfig(
        width=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
        head_dim=self.head_dim, num_kv_heads=self.num_kv_heads, mlp_hidden=self.intermediate_size,
        mlp="swiglu", norm="rmsnorm", norm_eps=self.rms_norm_eps, fused_qkv=False, qkv_bias=True,
        out_bias=False, mlp_bias=False, rope_layout="half", remat=self.remat,
        scan_layers=self.scan_layers, dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return self.trunk().init_cache(batch, max_len)

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> "QwenConfig":
    """From `config.model`; a field neither this class, VisionConfig nor TOKEN_FIELDS knows is a
    UserError naming it."""
    model = dict(model)
    check_known_fields(cls, "config.model", model, TOKEN_FIELDS)
    kw = {k: v for k, v in model.items() if k not in TOKEN_FIELDS and k != "vision"}
    kw["mrope_section"] = tuple(kw.get("mrope_section", cls.mrope_section))
    vision = None
    if model.get("vision") is not None:
      vkw = dict(model["vision"])
      check_known_fields(VisionConfig, "config.model.vision", vkw)
      vkw["fullatt_block_indexes"] = tuple(vkw.get("fullatt_block_indexes", ()))
      vkw.setdefault("dtype", kw.get("dtype", "float32"))
      vkw.setdefault("param_dtype", kw.get("param_dtype", "float32"))
      vision = VisionConfig(**vkw)
    return cls(vision=vision, **kw)


class Qwen2_5_VL(nn.Module):
  """Qwen2.5-VL. `__call__` runs the language model; `encode_images` runs the vision tower."""
  cfg: QwenConfig

  def setup(self):
    cfg = self.cfg
    trunk = cfg.trunk()
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=trunk.dtype, param_dtype=trunk.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.layers = Transformer(trunk)
    self.norm = layers.RMSNorm(cfg.rms_norm_eps, dtype=trunk.dtype, param_dtype=trunk.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Dense(cfg.vocab_size, ("embed", "vocab"), False, trunk.dtype,
                                  trunk.param_dtype, kernel_init=layers.normal_init(0.02))
    if cfg.vision is not None:
      self.visual = VisionTower(cfg.vision)
    self.rope = mrope(cfg.head_dim, cfg.mrope_section, cfg.rope_theta, layout="half")

  def init_all(self, tokens: jax.Array, positions: jax.Array):
    """Touches every parameter (language model and vision tower); use as `method=` in `init`."""
    out = self(tokens, positions=positions)
    if self.cfg.vision is not None:
      v = self.cfg.vision
      m = v.spatial_merge_size
      self.encode_images(jnp.zeros((m * m, v.patch_dim), v.dtype), ((1, m, m),))
    return out

  def encode_images(self, patches: jax.Array, grids: tuple[tuple[int, int, int], ...]) -> jax.Array:
    """patches [N, C*T*P*P] of all images, grids ((t, h, w), ...) -> image tokens [N/4, d]."""
    if self.cfg.vision is None:
      raise ValueError("this checkpoint has no vision tower (config.model.vision is None)")
    return self.visual(patches, grids)

  def embed(self, tokens: jax.Array, image_embeds: jax.Array | None = None,
            image_index: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] -> [B, T, d]. Where image_index [B, T] >= 0, take row image_index of
    image_embeds [M, d] instead (the image tokens from `encode_images`, or any other vectors)."""
    x = self.embed_tokens(tokens)
    if image_embeds is not None:
      picked = jnp.take(image_embeds, jnp.maximum(image_index, 0), axis=0).astype(x.dtype)
      x = jnp.where((image_index >= 0)[..., None], picked, x)
    return nn.with_logical_constraint(x, layers.ACT_EMBED)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final-normed hidden states [B, T, d] -> float32 logits [B, T, V] (float64 for float64 states)."""
    if self.cfg.tie_word_embeddings:
      out = self.embed_tokens.attend(h)
    else:
      out = self.lm_head(h)
    return nn.with_logical_constraint(out.astype(jnp.promote_types(out.dtype, jnp.float32)),
                                      layers.ACT_VOCAB)

  def __call__(self, tokens: jax.Array | None = None, *, positions: jax.Array,
               embeds: jax.Array | None = None, valid: jax.Array | None = None,
               cache: KVCache | None = None, image_embeds: jax.Array | None = None,
               image_index: jax.Array | None = None, collect_hidden: bool = False,
               taps: Sequence[int] = (), return_logits: bool = True,
               segment_ids: jax.Array | None = None) -> dict:
    """Language model forward.

    tokens [B, T] int (or embeds [B, T, d]); positions [B, T, 3] M-RoPE ids; valid [B, T] bool
    (False = pad, masked as a key); cache: KVCache or None; segment_ids [B, T] int or None (packed
    sequences: attention stays inside a segment; no cache). Returns a dict:
      hidden [B, T, d]     final-normed output (Hugging Face `hidden_states[-1]`)
      logits [B, T, V]     float32 (when return_logits)
      cache                the updated cache (None without a cache)
      hidden_states        tuple of L+1 arrays in HF convention: embeddings, outputs of layers
                           1..L-1, final-normed output (only when collect_hidden)
      taps                 {j: residual stream after layer j (1-based, raw)} for j in taps (kept by
                           the layer scan's carry: no per-layer copies unless collect_hidden)
    """
    if (tokens is None) == (embeds is None):
      raise ValueError("pass exactly one of tokens [B, T] and embeds [B, T, d]")
    x = self.embed(tokens, image_embeds, image_index) if embeds is None else embeds
    angles = self.rope.angles(positions)
    for j in taps:
      if not 1 <= j <= self.cfg.num_layers:
        raise ValueError(f"tap layer {j} out of range: expected 1..{self.cfg.num_layers}")
    h, cache, per_layer = self.layers(x, angles=angles, valid=valid, cache=cache,
                                      collect_hidden=collect_hidden, taps=() if collect_hidden else taps,
                                      segment_ids=segment_ids)
    hidden = self.norm(h)
    out = {"hidden": hidden, "cache": cache, "taps": {j: per_layer[j] for j in taps}}
    if collect_hidden:
      inner = tuple(per_layer[j] for j in range(1, self.cfg.num_layers))
      out["hidden_states"] = (x.astype(h.dtype),) + inner + (hidden,)
    if return_logits:
      out["logits"] = self.logits(hidden)
    return out


def abstract_params(cfg: QwenConfig):
  """Boxed (logically partitioned) abstract parameters: jax.eval_shape of the full init."""
  model = Qwen2_5_VL(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  positions = jnp.zeros((1, 1, 3), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, positions,
                                           method=Qwen2_5_VL.init_all))["params"]
