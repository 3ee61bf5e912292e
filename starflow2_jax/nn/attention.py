"""Causal multi-head attention with a pure-function KV cache.

The cache is an explicit pytree (`KVCache`): stacked per-layer K/V buffers [L, B, S, Hkv, Dh], a per-slot
validity mask [B, S] (left padding, masked keys) and a scalar write index. A call with T new tokens
writes them at `index`, attends causally over slots [0, index + T) and returns the new cache, so prefill
(T = prompt length) and decode (T = 1) are the same function. Writes are `dynamic_update_slice` on the
stacked buffers, which XLA performs in place when the cache is donated. Rewinding (Jacobi decoding) is
setting `index` back: slots past the index are masked by causality and overwritten by the next write.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.nn import attention_ops, layers
from starflow2_jax.nn.rope import apply_rope

Dtype = Any


@flax.struct.dataclass
class KVCache:
  """k, v: [L, B, S, Hkv, Dh]; valid: [B, S] bool; index: int32 scalar (next slot to write)."""
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
           dtype: Dtype = jnp.float32) -> "KVCache":
    shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  def rewind(self, index) -> "KVCache":
    return self.replace(index=jnp.asarray(index, jnp.int32))


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Pre-norm transformer trunk. Flavours: TarFlow/STARFlow (layernorm, gelu, fused qkv, biases) and
  Qwen2.5 (rmsnorm, swiglu, separate q/k/v with bias, bias-free out and MLP, GQA, rotate-half RoPE)."""
  width: int
  num_layers: int
  num_heads: int
  head_dim: int = 64
  num_kv_heads: int | None = None  # None = num_heads (no GQA)
  mlp_hidden: int | None = None  # None = 4 * width
  mlp: str = "gelu"  # gelu | swiglu
  norm: str = "layernorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-5
  fused_qkv: bool = True
  qkv_bias: bool = True
  out_bias: bool = True
  mlp_bias: bool = True
  rope_layout: str | None = None  # None (no RoPE) | half | interleaved
  attention_impl: str | None = None  # None = auto (per platform) | attention_ops.IMPLEMENTATIONS
  remat: bool = False  # rematerialise each layer in the backward pass
  dtype: Dtype = jnp.float32  # compute dtype of the trunk
  param_dtype: Dtype = jnp.float32

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def hidden(self) -> int:
    return self.mlp_hidden or 4 * self.width

  def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None) -> KVCache:
    return KVCache.init(self.num_layers, batch, max_len, self.kv_heads, self.head_dim,
                        dtype or self.dtype)


class Attention(nn.Module):
  """x: [B, T, d] -> [B, T, d]. With a cache, also returns the updated stacked K/V buffers."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, *, mask, angles=None, cache_kv=None, q_scale=None):
    cfg = self.cfg
    b, t, _ = x.shape
    nh, nkv, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    dense = lambda f, axes, bias, name: layers.Dense(f, axes, bias, cfg.dtype, cfg.param_dtype,
                                                     name=name)
    if cfg.fused_qkv:
      qkv = dense((nh + 2 * nkv) * hd, ("embed", "qkv"), cfg.qkv_bias, "qkv")(x)
      q, k, v = jnp.split(qkv, [nh * hd, (nh + nkv) * hd], axis=-1)
    else:
      q = dense(nh * hd, ("embed", "heads"), cfg.qkv_bias, "q")(x)
      k = dense(nkv * hd, ("embed", "kv_heads"), cfg.qkv_bias, "k")(x)
      v = dense(nkv * hd, ("embed", "kv_heads"), cfg.qkv_bias, "v")(x)
    q = q.reshape(b, t, nh, hd)
    k = k.reshape(b, t, nkv, hd)
    v = v.reshape(b, t, nkv, hd)
    if cfg.rope_layout is not None:
      if angles is None:
        raise ValueError("this transformer uses RoPE: pass angles [B, T, head_dim/2]")
      q = apply_rope(q, angles, cfg.rope_layout)
      k = apply_rope(k, angles, cfg.rope_layout)
    if q_scale is not None:  # per-row attention temperature: logits * q_scale[b]
      q = q * q_scale.astype(q.dtype)[:, None, None, None]
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    new_kv = None
    if cache_kv is not None:
      k_all, v_all, layer, index = cache_kv
      start = _slot_index(layer, 0, index, 0, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
      v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
      k, v = k_all[layer].astype(q.dtype), v_all[layer].astype(q.dtype)
      new_kv = (k_all, v_all)
    out = attention_ops.dot_product_attention(q, k, v, mask=mask, scale=hd ** -0.5,
                                              implementation=cfg.attention_impl)
    out = out.reshape(b, t, nh * hd)
    out = dense(x.shape[-1], ("heads", "embed"), cfg.out_bias, "out")(out)
    return out, new_kv


def _slot_index(*idx):
  """Start indices for dynamic_update_slice, all int32 (Python ints would become int64 under x64)."""
  return tuple(jnp.asarray(i, jnp.int32) for i in idx)


class TransformerLayer(nn.Module):
  """Pre-norm layer: h + Attn(Norm(h)), then h + MLP(Norm(h))."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, h, *, mask, angles=None, cache_kv=None, q_scale=None):
    cfg = self.cfg
    a, new_kv = Attention(cfg, name="attn")(
        layers.make_norm(cfg.norm, cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="norm1")(h),
        mask=mask, angles=angles, cache_kv=cache_kv, q_scale=q_scale)
    h = h + a
    m = layers.Mlp(cfg.hidden, cfg.mlp, cfg.mlp_bias, cfg.dtype, cfg.param_dtype, name="mlp")(
        layers.make_norm(cfg.norm, cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="norm2")(h))
    h = nn.with_logical_constraint(h + m, ("batch", "length", "embed"))
    return h, new_kv


def causal_mask(t: int, valid=None, cache: KVCache | None = None):
  """Boolean attention mask broadcastable to [B, H, T, S].

  Without a cache: query i sees keys j <= i (S = T), and only valid keys if `valid` [B, T] is given.
  With a cache: the T queries sit at slots index..index+T-1 and see slots <= their own that are valid.
  """
  if cache is None:
    m = jnp.tril(jnp.ones((t, t), bool))[None, None]
    return m if valid is None else m & valid[:, None, None, :]
  q_pos = cache.index + jnp.arange(t)
  k_pos = jnp.arange(cache.max_len)
  m = (k_pos[None, :] <= q_pos[:, None])[None, None]
  return m & cache.valid[:, None, None, :]


class Transformer(nn.Module):
  """Stack of `num_layers` pre-norm layers (no final norm; callers add the one they need).

  x: [B, T, d]; angles: [B, T, head_dim/2] (RoPE only); valid: [B, T] bool, False for pad tokens
  (masked as keys); cache: KVCache or None; q_scale: [B] attention temperature factor or None;
  residual_adds: optional {layer j: [B, T, d]} added to the residual stream before layer j.
  Returns (h [B, T, d], new cache or None, hidden states) where hidden states are the residual stream
  after each layer (a tuple of num_layers arrays) when `collect_hidden`, else ().
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, *, angles=None, valid=None, cache: KVCache | None = None, q_scale=None,
               residual_adds=None, collect_hidden: bool = False):
    cfg = self.cfg
    b, t, _ = x.shape
    if cache is not None:
      if valid is None:
        valid = jnp.ones((b, t), bool)
      cache = cache.replace(
          valid=jax.lax.dynamic_update_slice(cache.valid, valid, _slot_index(0, cache.index)))
    mask = causal_mask(t, valid, cache)
    layer_cls = nn.remat(TransformerLayer) if cfg.remat else TransformerLayer
    h = x.astype(cfg.dtype)
    k_all = v_all = None
    if cache is not None:
      k_all, v_all = cache.k, cache.v
    hidden = []
    for i in range(cfg.num_layers):
      if residual_adds and i in residual_adds:
        h = h + residual_adds[i].astype(h.dtype)
      cache_kv = None if cache is None else (k_all, v_all, i, cache.index)
      h, kv = layer_cls(cfg, name=f"layers_{i}")(h, mask=mask, angles=angles, cache_kv=cache_kv,
                                                  q_scale=q_scale)
      if kv is not None:
        k_all, v_all = kv
      if collect_hidden:
        hidden.append(h)
    if cache is not None:
      cache = cache.replace(k=k_all, v=v_all, index=(cache.index + t).astype(jnp.int32))
    return h, cache, tuple(hidden)
