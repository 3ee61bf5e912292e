"""Losses, bits/dim and dequantisation (STARFLOW2.md 2.5, 2.6)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from starflow2_jax.flows.model import FlowOutput

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# 8-bit images in [-1, 1]: one quantisation bin has width 2/256 = 1/128, so a density becomes a
# probability of the 256-level discretisation by adding log(128) nats per dimension.
LOG_BIN = math.log(128.0)


def nll_per_sample(out: FlowOutput, latent_norm_reg: float = 0.0) -> jax.Array:
  """[B] per-dimension NLL without the 0.5 log(2 pi) constant: 0.5 mean(z^2) - logdets
  (+ latent_norm_reg * sum over non-final blocks of mean(u^2)). Float32 reductions."""
  z = out.z.astype(jnp.promote_types(out.z.dtype, jnp.float32))
  loss = 0.5 * jnp.mean(jnp.square(z), axis=(1, 2)) - out.logdets
  if latent_norm_reg:
    loss = loss + latent_norm_reg * out.latent_norm
  return loss


def loss(out: FlowOutput, latent_norm_reg: float = 0.0, weights: jax.Array | None = None):
  """Scalar training loss: the (optionally weighted) batch mean of `nll_per_sample`."""
  per = nll_per_sample(out, latent_norm_reg)
  return jnp.mean(per if weights is None else per * weights)


def bits_per_dim(nll: jax.Array) -> jax.Array:
  """bpd = (L + 0.5 log 2pi + log 128) / ln 2 for 8-bit data in [-1, 1] (uniformly dequantised)."""
  return (nll + HALF_LOG_2PI + LOG_BIN) / math.log(2.0)


def log_prob(out: FlowOutput) -> jax.Array:
  """[B] summed log-density log p(x) = -0.5|z|^2 - (TD/2) log 2pi + log|det dz/dx|."""
  n = out.z.shape[1] * out.z.shape[2]
  return -n * (0.5 * jnp.mean(jnp.square(out.z), axis=(1, 2)) - out.logdets + HALF_LOG_2PI)


def dequantize(key: jax.Array, x: jax.Array, kind: str, noise_std: float) -> jax.Array:
  """x in [-1, 1] (8-bit values). gaussian: x + std * eps. uniform: x = (x_int + U[0,1)) / 256 * 2 - 1
  with x_int = (x + 1) * 127.5, TarFlow's dequantisation for bits/dim."""
  if kind == "gaussian":
    return x + noise_std * jax.random.normal(key, x.shape, x.dtype)
  if kind == "uniform":
    x_int = jnp.round((x + 1.0) * 127.5)
    return (x_int + jax.random.uniform(key, x.shape, x.dtype)) / 256.0 * 2.0 - 1.0
  raise ValueError(f"dequantisation kind must be 'gaussian' or 'uniform', got {kind!r}")
