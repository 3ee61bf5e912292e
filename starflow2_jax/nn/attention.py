"""Causal multi-head attention with a pure-function KV cache, and the scanned transformer stack.

The stack stores its layers stacked ([L, ...] parameters under `stack/`, logical axis `layers`) and applies
them with `nn.scan`; the rematerialisation policy (`TransformerConfig.remat`) is applied inside the scan.
The cache is an explicit pytree (`KVCache`): stacked per-layer K/V buffers [L, B, S, Hkv, Dh], a per-slot
validity mask [B, S] (left padding, masked keys) and a scalar write index. A call with T new tokens
writes them at `index`, attends causally over slots [0, index + T) and returns the new cache, so prefill
(T = prompt length) and decode (T = 1) are the same function. Writes are `dynamic_update_slice` on the
stacked buffers, which XLA performs in place when the cache is donated. Rewinding (Jacobi decoding) is
setting `index` back: slots past the index are masked by causality and overwritten by the next write.
The K/V buffers are carried by the layer scan (each layer writes its own row), and carry the cache
logical names `CACHE_KV` ([L, B, S, Hkv, Dh]) and `CACHE_VALID` ([B, S]).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from starflow2_jax import parallel
from starflow2_jax.nn import attention_ops, layers
from starflow2_jax.nn.rope import apply_rope

Dtype = Any

# Logical names of the cache buffers (parallel.DEFAULT_LOGICAL_RULES maps them to mesh axes).
CACHE_KV = ("cache_layers", "cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
CACHE_VALID = ("cache_batch", "cache_length")
# The leading axis of stacked layer parameters.
LAYERS_AXIS = "layers"
# Rematerialisation policies of the layer scan: none (save everything), dots_saveable (recompute
# everything but matmul outputs), full (save only the layer inputs).
REMAT_POLICIES = ("none", "dots_saveable", "full")


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
               valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32)).constrain()

  @classmethod
  def logical_axes(cls) -> "KVCache":
    """The logical PartitionSpec of every buffer (a KVCache of PartitionSpecs)."""
    return cls(k=P(*CACHE_KV), v=P(*CACHE_KV), valid=P(*CACHE_VALID), index=P())

  def shardings(self, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, rules) -> "KVCache":
    """NamedShardings of this cache's buffers on `mesh` under `rules` (a KVCache of shardings; works
    on an abstract cache from `jax.eval_shape`). Dimensions a mesh axis does not divide replicate."""
    axes = self.logical_axes()
    boxed = jax.tree.map(lambda x, spec: nn.Partitioned(x, names=tuple(spec)), self, axes)
    return parallel.logical_to_shardings(boxed, mesh, rules)

  def constrain(self) -> "KVCache":
    """Sharding constraints on the buffers (active under `parallel.sharding_context`)."""
    return self.replace(k=nn.with_logical_constraint(self.k, CACHE_KV),
                        v=nn.with_logical_constraint(self.v, CACHE_KV),
                        valid=nn.with_logical_constraint(self.valid, CACHE_VALID))

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
  remat: str = "none"  # rematerialisation inside the layer scan: one of REMAT_POLICIES
  scan_layers: bool = True  # False: the same stacked parameters, the scan fully unrolled
  dtype: Dtype = jnp.float32  # compute dtype of the trunk
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

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
    q = nn.with_logical_constraint(q, layers.ACT_HEADS)
    k = nn.with_logical_constraint(k, layers.ACT_KV_HEADS)
    v = nn.with_logical_constraint(v, layers.ACT_KV_HEADS)
    new_kv = None
    if cache_kv is not None:
      k_all, v_all, layer, index = cache_kv
      start = _slot_index(layer, 0, index, 0, 0)
      k_all = nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start), CACHE_KV)
      v_all = nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start), CACHE_KV)
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
    h = nn.with_logical_constraint(h + m, layers.ACT_EMBED)
    return h, new_kv


class _ScanStep(TransformerLayer):
  """Layer `i` of the stack as a scan step over carry (h [B, T, d], (k_all, v_all) or None, taps).

  adds: {0-based layer j: [B, T, d]} added before layer j; tap_layers: 1-based layers whose output
  the carry keeps (taps[j] [B, T, d]). Returns the carry and, when `collect`, h as the scan output.
  """
  collect: bool = False

  def __call__(self, carry, i, mask, angles, index, q_scale, adds):
    h, kv, taps = carry
    for j, add in adds.items():  # one select per add and layer, never L copies of an add
      h = h + jnp.where(i == j, add.astype(h.dtype), jnp.zeros((), h.dtype))
    cache_kv = None if kv is None else (*kv, i, index)
    h, kv = super().__call__(h, mask=mask, angles=angles, cache_kv=cache_kv, q_scale=q_scale)
    taps = {j: jnp.where(i == j - 1, h, t) for j, t in taps.items()}
    return (h, kv, taps), (h if self.collect else None)


def _remat(step_cls, policy: str):
  if policy == "none":
    return step_cls
  saveable = jax.checkpoint_policies.dots_saveable if policy == "dots_saveable" else None
  return nn.remat(step_cls, policy=saveable, prevent_cse=False)  # no CSE barrier needed inside scan


def causal_mask(t: int, valid=None, cache: KVCache | None = None, segment_ids=None):
  """Boolean attention mask broadcastable to [B, H, T, S].

  Without a cache: query i sees keys j <= i (S = T), and only valid keys if `valid` [B, T] is given,
  and only keys of its own segment if `segment_ids` [B, T] int is given (packed sequences).
  With a cache: the T queries sit at slots index..index+T-1 and see slots <= their own that are valid.
  """
  if cache is None:
    m = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if segment_ids is not None:
      m = m & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return m if valid is None else m & valid[:, None, None, :]
  if segment_ids is not None:
    raise ValueError("segment_ids (packed sequences) are for the cache-free forward only")
  q_pos = cache.index + jnp.arange(t)
  k_pos = jnp.arange(cache.max_len)
  m = (k_pos[None, :] <= q_pos[:, None])[None, None]
  return m & cache.valid[:, None, None, :]


class Transformer(nn.Module):
  """Stack of `num_layers` pre-norm layers (no final norm; callers add the one they need).

  Parameters: `stack/{norm1,attn,norm2,mlp}/...` with a leading layer axis [L, ...] (logical `layers`).
  x: [B, T, d]; angles: [B, T, head_dim/2] (RoPE only); valid: [B, T] bool, False for pad tokens
  (masked as keys); cache: KVCache or None; q_scale: [B] attention temperature factor or None;
  residual_adds: optional {0-based layer j: [B, T, d]} added to the residual stream before layer j;
  taps: 1-based layers j whose raw output (the residual stream after layer j) is returned;
  segment_ids: [B, T] int or None: attention stays inside a segment (packing; no cache).
  Returns (h [B, T, d], new cache or None, hidden) where hidden is {j: [B, T, d]} for every j in taps,
  and for every layer 1..L when `collect_hidden`.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, *, angles=None, valid=None, cache: KVCache | None = None, q_scale=None,
               residual_adds=None, collect_hidden: bool = False, taps: Sequence[int] = (),
               segment_ids=None):
    cfg = self.cfg
    b, t, _ = x.shape
    for j in list(taps) + [j + 1 for j in residual_adds or {}]:
      if not 1 <= j <= cfg.num_layers:
        raise ValueError(f"layer {j} (1-based) of a tap or residual add is out of range: expected "
                         f"1..{cfg.num_layers}")
    index = None
    if cache is not None:
      if valid is None:
        valid = jnp.ones((b, t), bool)
      cache = cache.replace(
          valid=jax.lax.dynamic_update_slice(cache.valid, valid, _slot_index(0, cache.index)))
      index = cache.index
    mask = causal_mask(t, valid, cache, segment_ids)
    h = nn.with_logical_constraint(x.astype(cfg.dtype), layers.ACT_EMBED)
    kv = None if cache is None else (cache.k, cache.v)
    tap_init = {j: jnp.zeros_like(h) for j in taps}
    step = nn.scan(_remat(_ScanStep, cfg.remat), variable_axes={"params": 0},
                   split_rngs={"params": True}, in_axes=(0,) + (nn.broadcast,) * 5,
                   length=cfg.num_layers, unroll=1 if cfg.scan_layers else cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
    (h, kv, hidden), per_layer = step(cfg, collect_hidden, name="stack")(
        (h, kv, tap_init), jnp.arange(cfg.num_layers, dtype=jnp.int32), mask, angles, index,
        q_scale, dict(residual_adds or {}))
    if collect_hidden:
      hidden = {j + 1: per_layer[j] for j in range(cfg.num_layers)}
    if cache is not None:
      cache = cache.replace(k=kv[0], v=kv[1], index=(cache.index + t).astype(jnp.int32)).constrain()
    return h, cache, hidden
