"""A bidirectional pre-norm transformer stack (the DINOv2 trunk, the FAE decoders), scanned over layers.

Built from the shared layers (`nn.attention.Attention`, `nn.layers.Mlp`, `nn.layers.make_norm`) and
the shared `TransformerConfig`; it differs from `nn.Transformer` in two ways the FAE needs:
  * no mask: every token attends to every token (no KV cache, no causality);
  * optional LayerScale (DINOv2): `x + ls1 * Attn(Norm1(x))`, then `x + ls2 * Mlp(Norm2(x))`, with
    `ls1`, `ls2` [d] learned per-channel scales initialised to `layer_scale`.

Parameters: `stack/{norm1,attn,norm2,mlp}/...` and (LayerScale) `stack/{ls1,ls2}/scale`, each with a
leading layer axis [L, ...] (logical `layers`), as `nn.Transformer` stores them.
x: [B, T, d] -> [B, T, d]; angles [B, T, head_dim/2] when the config uses RoPE.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.nn import layers
from starflow2_jax.nn.attention import LAYERS_AXIS, Attention, TransformerConfig


class LayerScale(nn.Module):
  """x [..., d] * scale [d] (DINOv2's `lambda1`), scale initialised to `init_value`."""
  init_value: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.constant(self.init_value), ("embed",)), (x.shape[-1],), self.param_dtype)
    return x * scale.astype(x.dtype)


class EncoderLayer(nn.Module):
  """One bidirectional pre-norm layer, as a scan step over the carry h [B, T, d]."""
  cfg: TransformerConfig
  layer_scale: float | None = None  # LayerScale init value; None = no LayerScale
  collect: bool = False  # also emit h as the scan output (every layer's hidden state)

  @nn.compact
  def __call__(self, h, angles):
    cfg = self.cfg
    norm = lambda name: layers.make_norm(cfg.norm, cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
    a, _ = Attention(cfg, name="attn")(norm("norm1")(h), mask=None, angles=angles)
    if self.layer_scale is not None:
      a = LayerScale(self.layer_scale, cfg.param_dtype, name="ls1")(a)
    h = h + a
    m = layers.Mlp(cfg.hidden, cfg.mlp, cfg.mlp_bias, cfg.dtype, cfg.param_dtype, name="mlp")(
        norm("norm2")(h))
    if self.layer_scale is not None:
      m = LayerScale(self.layer_scale, cfg.param_dtype, name="ls2")(m)
    h = nn.with_logical_constraint(h + m, layers.ACT_EMBED)
    return h, (h if self.collect else None)


def _remat(step_cls, policy: str):
  """The layer step under `TransformerConfig.remat` (as `nn.Transformer` applies it)."""
  if policy == "none":
    return step_cls
  saveable = jax.checkpoint_policies.dots_saveable if policy == "dots_saveable" else None
  return nn.remat(step_cls, policy=saveable, prevent_cse=False)


class EncoderStack(nn.Module):
  """`cfg.num_layers` EncoderLayers, stacked and scanned. Returns (h [B, T, d], hidden) with hidden
  [L, B, T, d] (the residual stream after each layer) when `collect_hidden`, else None. No final norm."""
  cfg: TransformerConfig
  layer_scale: float | None = None

  @nn.compact
  def __call__(self, x, angles=None, collect_hidden: bool = False):
    cfg = self.cfg
    h = nn.with_logical_constraint(x.astype(cfg.dtype), layers.ACT_EMBED)
    step = nn.scan(_remat(EncoderLayer, cfg.remat), variable_axes={"params": 0},
                   split_rngs={"params": True}, in_axes=(nn.broadcast,), length=cfg.num_layers,
                   unroll=1 if cfg.scan_layers else cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
    h, hidden = step(cfg, self.layer_scale, collect_hidden, name="stack")(h, angles)
    return h, hidden
