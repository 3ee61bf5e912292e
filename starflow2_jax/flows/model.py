"""FlowModel: a stack of autoregressive flow blocks (TarFlow stack or STARFlow deep-shallow stack).

Forward (data -> noise): x = tokens, u_k = block_k(u_{k-1}), z = u_{K-1}. The likelihood pieces are
returned in a `FlowOutput`; losses live in `flows.likelihood`, sampling in `flows.sampling`.
"""
from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax import nn as snn
from starflow2_jax.flows.block import FlowBlock
from starflow2_jax.flows.config import FlowConfig


@flax.struct.dataclass
class FlowOutput:
  """z [B, T, D]; logdets [B] = sum over blocks of each block's per-dimension mean log-det;
  block_logdets tuple of [B, T, D] per-element log-dets (each in its block's token order);
  block_outputs tuple of [B, T, D] outputs u_k of every block (the last one is z)."""
  z: jax.Array
  logdets: jax.Array
  block_logdets: tuple
  block_outputs: tuple

  @property
  def latent_norm(self) -> jax.Array:
    """[B]: sum over non-final blocks of mean(u_k^2) (STARFlow's latent-norm regulariser term)."""
    terms = [jnp.mean(jnp.square(u), axis=(1, 2)) for u in self.block_outputs[:-1]]
    return sum(terms) if terms else jnp.zeros_like(self.logdets)


def drop_labels(rng: jax.Array, labels: jax.Array, rate: float) -> jax.Array:
  """Replace each label by -1 (dropped -> mean class embedding) with probability `rate`."""
  return jnp.where(jax.random.bernoulli(rng, rate, labels.shape), -1, labels)


class FlowModel(nn.Module):
  """tokens [B, T, D] (model token layout), labels [B] int (-1 = dropped) or None,
  context [B, Lc, context_dim] (STARFlow deep-block prefix) or None."""
  cfg: FlowConfig

  def setup(self):
    self.blocks = [FlowBlock(self.cfg, i, name=f"blocks_{i}") for i in range(self.cfg.num_blocks)]

  def _check_tokens(self, tokens):
    snn.check_shape(
        f"tokens of a {self.cfg.image_size[0]}x{self.cfg.image_size[1]}x{self.cfg.channels} image "
        f"with patch {self.cfg.patch_size}", tokens, (None, self.cfg.num_tokens, self.cfg.token_dim))

  def _labels(self, labels, train: bool):
    if labels is None or not self.cfg.num_classes:
      return None
    labels = jnp.asarray(labels, jnp.int32)
    if train and self.cfg.label_drop > 0:
      labels = drop_labels(self.make_rng("dropout"), labels, self.cfg.label_drop)
    return labels

  def __call__(self, tokens, labels=None, context=None, train: bool = False) -> FlowOutput:
    self._check_tokens(tokens)
    labels = self._labels(labels, train)
    u = tokens.astype(self.cfg.flow_dtype)
    outputs, logdets = [], []
    for i, block in enumerate(self.blocks):
      cond = self.cfg.is_conditional(i)
      u, ld, _ = block(u, labels if cond else None, context if self.cfg.has_context(i) else None)
      outputs.append(u)
      logdets.append(ld)
    total = sum(jnp.mean(ld, axis=(1, 2)) for ld in logdets)
    return FlowOutput(z=u, logdets=total, block_logdets=tuple(logdets), block_outputs=tuple(outputs))

  # Streaming entry points for `flows.sampling` (called through `model.apply(..., method=...)`).
  def block_start(self, index: int, cache, labels=None, context=None, q_scale=None):
    return self.blocks[index].start(cache, labels, context, q_scale)

  def block_feed(self, index: int, cache, x, n0, labels=None, q_scale=None):
    return self.blocks[index].feed(cache, x, n0, labels, q_scale)

  def block_forward(self, index: int, x, labels=None, context=None, q_scale=None):
    return self.blocks[index](x, labels, context, q_scale)
