"""One autoregressive affine flow block, in the TarFlow and STARFlow parametrisations (STARFLOW2.md 2).

The block works in its own (permuted) token order. For every target token n it predicts affine
parameters theta_n from tokens < n only:
  * TarFlow: the transformer reads [x_0, ..., x_{T-1}] (+ learned positions permuted with the tokens,
    + class embedding); the output is shifted by one token, so theta_0 = identity and token 0 passes
    through. theta = (a, b): z = (x - b) exp(-a).
  * STARFlow: the transformer reads [context prefix; sos; x_0, ..., x_{T-2}] with 2-D (3-D with a
    prefix) RoPE whose table is NOT permuted; theta_n comes from the output at sos + n. Soft clip,
    sigma = softplus(a + 0.5413): z = (x - mu) / sigma.
Both are expressed as `Affine(shift, scale, log_scale)`, always in float32 (float64 in x64 tests).

Streaming (sampling) interface, the same function for prefill and decode:
  `start(cache, ...)` -> (cache, theta_0)   (STARFlow feeds [prefix; sos]; TarFlow needs nothing)
  `feed(cache, x[n0:n0+k], n0, ...)` -> (cache, theta_{n0+1 .. n0+k})
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax import nn as snn
from starflow2_jax.flows.config import SOFTPLUS_SHIFT, FlowConfig
from starflow2_jax.flows.permutations import permute
from starflow2_jax.nn import rope as rope_lib


class Affine(NamedTuple):
  """Per-token affine parameters [B, n, D]: x = shift + scale * z, log-det(z wrt x) = -log_scale."""
  shift: jax.Array
  scale: jax.Array
  log_scale: jax.Array

  def forward(self, x):
    return (x - self.shift) / self.scale

  def inverse(self, z):
    return self.shift + self.scale * z


def affine_from_raw(raw: jax.Array, parametrisation: str, soft_clip: float) -> Affine:
  """raw proj_out output [..., 2D] (float32) -> Affine. First half: scale parameter; second: shift."""
  a, b = jnp.split(raw, 2, axis=-1)
  if parametrisation == "tarflow":
    return Affine(shift=b, scale=jnp.exp(a), log_scale=a)
  a = soft_clip * jnp.tanh(a / soft_clip)
  mu = soft_clip * jnp.tanh(b / soft_clip)
  sigma = jax.nn.softplus(a + SOFTPLUS_SHIFT)
  return Affine(shift=mu, scale=sigma, log_scale=jnp.log(sigma))


def identity_affine(batch: int, n: int, d: int, dtype) -> Affine:
  zeros = jnp.zeros((batch, n, d), dtype)
  return Affine(zeros, jnp.ones_like(zeros), zeros)


def mean_class_or_label(table: jax.Array, labels: jax.Array | None, batch: int) -> jax.Array:
  """Class embedding per row [B, d]; label -1 (dropped) or labels=None give the mean of the rows."""
  mean = jnp.mean(table, axis=0)
  if labels is None:
    return jnp.broadcast_to(mean, (batch, table.shape[-1]))
  rows = table[jnp.clip(labels, 0, table.shape[0] - 1)]
  return jnp.where((labels < 0)[:, None], mean[None], rows)


class FlowBlock(nn.Module):
  """Block `index` of the stack described by `cfg`.

  Shapes: x, z [B, T, D] in data (un-permuted) order for `__call__`; the streaming methods take and
  return tokens in the block's permuted order. labels [B] int (-1 = dropped) or None;
  context [B, Lc, context_dim] (deep STARFlow block only).
  """
  cfg: FlowConfig
  index: int

  def setup(self):
    cfg = self.cfg
    pdt, cdt = cfg.params_dtype, cfg.compute_dtype
    self.is_tarflow = cfg.parametrisation == "tarflow"
    self.permutation = cfg.permutations[self.index]
    self.conditional = cfg.is_conditional(self.index)
    self.with_context = cfg.has_context(self.index)
    t, d = cfg.num_tokens, cfg.token_dim
    self.tcfg = transformer_config(cfg, self.index)
    self.proj_in = snn.Dense(cfg.width, ("latent", "embed"), dtype=cdt, param_dtype=pdt)
    if cfg.positions == "learned":
      self.pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
          snn.layers.normal_init(0.01), ("length", "embed")), (t, cfg.width), pdt)
    if not self.is_tarflow:
      self.sos = self.param("sos", nn.with_logical_partitioning(
          snn.layers.normal_init(1.0), ("latent",)), (d,), pdt)
    if self.conditional and cfg.num_classes:
      self.class_embed = self.param("class_embed", nn.with_logical_partitioning(
          snn.layers.normal_init(0.01), ("classes", "embed")), (cfg.num_classes, cfg.width), pdt)
    if self.with_context:
      self.proj_ctx = snn.Dense(cfg.width, ("context", "embed"), dtype=cdt, param_dtype=pdt)
    self.transformer = snn.Transformer(self.tcfg)
    if not self.is_tarflow:
      self.final_norm = snn.RMSNorm(eps=1e-6, scale_offset=1.0, dtype=cfg.flow_dtype, param_dtype=pdt)
    # The head is a float32 island with highest matmul precision; its weight starts at zero.
    self.proj_out = snn.Dense(2 * d, ("embed", "latent"), dtype=cfg.flow_dtype, param_dtype=pdt,
                              kernel_init=nn.initializers.zeros,
                              precision=jax.lax.Precision.HIGHEST)
    if cfg.positions == "rope2d":
      h, w = cfg.grid
      self.rope_spec = (rope_lib.starflow_3d if self.with_context else rope_lib.starflow_2d)(
          cfg.head_dim, cfg.rope_base)
      grid_pos = rope_lib.starflow_grid_positions(h, w, cfg.rope_pt)
      if self.with_context:
        grid_pos = np.concatenate([grid_pos, np.zeros((t, 1))], -1)
      # one spare row: the STARFlow stream has T+1 slots (sos + T tokens) when a chunk is re-fed
      self.grid_pos = np.concatenate([grid_pos, grid_pos[-1:]], 0)

  # -- pieces ----------------------------------------------------------------------------------
  def _embed(self, x, seq_index, labels):
    """x [B, n, D] at stream indices seq_index [n] -> transformer input [B, n, width]."""
    h = self.proj_in(x.astype(self.tcfg.dtype))
    if self.cfg.positions == "learned":
      h = h + permute(self.pos_embed, self.permutation, axis=0)[seq_index].astype(h.dtype)
    if self.conditional and self.cfg.num_classes:
      h = h + mean_class_or_label(self.class_embed, labels, x.shape[0])[:, None].astype(h.dtype)
    return h

  def _angles(self, batch, seq_index, prefix_len: int = 0):
    """RoPE angles [B, prefix_len + n, F] for a context prefix then image stream indices seq_index."""
    if self.cfg.positions != "rope2d":
      return None
    pos = jnp.asarray(self.grid_pos)[seq_index]
    if prefix_len:
      text = np.zeros((prefix_len, 3))
      text[:, 2] = np.arange(prefix_len) * self.cfg.rope_pt / prefix_len
      pos = jnp.concatenate([jnp.asarray(text, pos.dtype), pos], 0)
    return jnp.broadcast_to(self.rope_spec.angles(pos[None]), (batch, *pos.shape[:1],
                                                                 len(self.rope_spec.inv_freq)))

  def _head(self, h) -> jax.Array:
    """Transformer output [B, n, width] -> raw parameters [B, n, 2D] in the flow dtype."""
    if not self.is_tarflow:
      h = self.final_norm(h)
    return self.proj_out(h.astype(self.cfg.flow_dtype))

  def _affine(self, raw) -> Affine:
    return affine_from_raw(raw, self.cfg.parametrisation, self.cfg.soft_clip)

  def _context_prefix(self, context):
    if not self.with_context:
      return None
    if context is None:
      raise ValueError(f"block {self.index} is conditioned on a context prefix: pass context "
                       f"[B, Lc, {self.cfg.context_dim}]")
    snn.check_shape("context", context, (None, None, self.cfg.context_dim))
    return self.proj_ctx(context.astype(self.tcfg.dtype))

  def _trunk(self, h, angles, cache, q_scale):
    out, cache, _ = self.transformer(h, angles=angles, cache=cache, q_scale=q_scale)
    return out, cache

  # -- parallel forward (training, likelihood) ----------------------------------------------------
  def __call__(self, x, labels=None, context=None, q_scale=None):
    """x [B, T, D] (data order) -> (z [B, T, D] data order, logdet [B, T, D] per element in block
    order, Affine [B, T, D] in block order). q_scale [B]: per-row attention temperature factor."""
    b, t, _ = x.shape
    fdt = self.cfg.flow_dtype
    xp = permute(x.astype(fdt), self.permutation)
    if self.is_tarflow:
      h = self._embed(xp, jnp.arange(t), labels)
      out, _ = self._trunk(h, None, None, q_scale)
      raw = self._head(out)
      raw = jnp.concatenate([jnp.zeros_like(raw[:, :1]), raw[:, :-1]], axis=1)  # one-token shift
    else:
      stream = jnp.concatenate([jnp.broadcast_to(self.sos.astype(fdt), (b, 1, xp.shape[-1])),
                                xp[:, :-1]], axis=1)
      h = self._embed(stream, jnp.arange(t), labels)
      prefix = self._context_prefix(context)
      lc = 0 if prefix is None else prefix.shape[1]
      if prefix is not None:
        h = jnp.concatenate([prefix.astype(h.dtype), h], axis=1)
      out, _ = self._trunk(h, self._angles(b, jnp.arange(t), lc), None, q_scale)
      raw = self._head(out[:, lc:])
    theta = self._affine(raw)
    z = theta.forward(xp)
    return permute(z, self.permutation), -theta.log_scale, theta

  # -- streaming (sampling) -----------------------------------------------------------------------
  def start(self, cache, labels=None, context=None, q_scale=None):
    """Prefill what precedes token 0. Returns (cache, theta_0 [B, 1, D])."""
    b = cache.valid.shape[0]
    fdt = self.cfg.flow_dtype
    if self.is_tarflow:
      return cache, identity_affine(b, 1, self.cfg.token_dim, fdt)
    sos = jnp.broadcast_to(self.sos.astype(fdt), (b, 1, self.cfg.token_dim))
    h = self._embed(sos, jnp.arange(1), labels)
    prefix = self._context_prefix(context)
    lc = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
      h = jnp.concatenate([prefix.astype(h.dtype), h], axis=1)
    out, cache = self._trunk(h, self._angles(b, jnp.arange(1), lc), cache, q_scale)
    return cache, self._affine(self._head(out[:, -1:]))

  def feed(self, cache, x, n0, labels=None, q_scale=None):
    """Feed tokens x [B, k, D] (block order) that are tokens n0..n0+k-1 of the image.

    Writes them to the cache and returns (cache, theta for tokens n0+1 .. n0+k) [B, k, D].
    """
    b, k, _ = x.shape
    seq_index = n0 + jnp.arange(k) + (0 if self.is_tarflow else 1)
    h = self._embed(x.astype(self.cfg.flow_dtype), seq_index, labels)
    out, cache = self._trunk(h, self._angles(b, seq_index), cache, q_scale)
    return cache, self._affine(self._head(out))



def transformer_config(cfg: FlowConfig, index: int) -> snn.TransformerConfig:
  """The trunk of block `index`: pre-LayerNorm, exact-GELU MLP, fused qkv, biases (STARFLOW2.md 2.4)."""
  return snn.TransformerConfig(
      width=cfg.width, num_layers=cfg.layers_per_block[index], num_heads=cfg.width // cfg.head_dim,
      head_dim=cfg.head_dim, mlp_hidden=cfg.mlp_ratio * cfg.width, norm_eps=cfg.norm_eps,
      rope_layout=None if cfg.positions == "learned" else "interleaved",
      attention_impl=cfg.attention_impl, remat=cfg.remat, scan_layers=cfg.scan_layers,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype)


def init_block_cache(cfg: FlowConfig, index: int, batch: int, context_len: int = 0) -> snn.KVCache:
  """A KV cache for block `index` with room for [prefix; sos; T tokens]."""
  return transformer_config(cfg, index).init_cache(batch, context_len + cfg.num_tokens + 1)
