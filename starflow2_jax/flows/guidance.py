"""Classifier-free guidance rules on per-token affine parameters (STARFLOW2.md 7.2).

Both branches are computed in one batched pass ([cond; uncond]); these functions combine them.
Weight convention: w = 0 is no guidance.
  * gaussian (STARFlow): s = min(sigma_c/sigma_u, 1)^2, sigma = sigma_c / sqrt(1 + w - w s),
    mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s).
  * linear (TarFlow): log_scale += g (log_scale_c - log_scale_u), shift += g (shift_c - shift_u),
    restricted to `guide_what` in {a, b, ab} (a = the scale parameter, b = the shift).
Annealing: TarFlow's ramp g = w n / (T - 1) for token n (its reverse step i = n - 1 uses
w (i+1)/(T-1)); STARFlow's w (n + 1) / N.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from starflow2_jax.errors import UserError
from starflow2_jax.flows.block import Affine

RULES = ("gaussian", "linear")


@dataclasses.dataclass(frozen=True)
class Guidance:
  weight: float = 0.0
  rule: str = "gaussian"
  anneal: bool = False
  guide_what: str = "ab"  # linear rule only
  attn_temp: float = 1.0  # attention temperature of the unconditional branch (TarFlow)

  def __post_init__(self):
    if self.rule not in RULES:
      raise UserError(f"guidance rule must be one of {RULES}, got {self.rule!r}")
    if self.guide_what not in ("a", "b", "ab"):
      raise UserError(f"guide_what must be 'a', 'b' or 'ab', got {self.guide_what!r}")
    if self.attn_temp <= 0:
      raise UserError(f"attn_temp must be positive, got {self.attn_temp}")

  @property
  def active(self) -> bool:
    return self.weight != 0

  @classmethod
  def for_model(cls, parametrisation: str, weight: float, **kw) -> "Guidance":
    """A model's own rule: TarFlow's linear rule for TarFlow models, the Gaussian rule otherwise."""
    return cls(weight=weight, rule="linear" if parametrisation == "tarflow" else "gaussian", **kw)

  def weights(self, n, num_tokens: int, parametrisation: str):
    """Per-token weight for token indices n [k] -> [k]."""
    n = jnp.asarray(n)
    if not self.anneal:
      return jnp.full(n.shape, self.weight, jnp.float32)
    if parametrisation == "tarflow":
      return self.weight * n / max(num_tokens - 1, 1)
    return self.weight * (n + 1) / num_tokens

  def combine(self, cond: Affine, uncond: Affine, w) -> Affine:
    """cond, uncond: Affine [B, k, D]; w: scalar or [k] -> guided Affine [B, k, D]."""
    w = jnp.asarray(w, cond.shift.dtype)
    w = w[None, :, None] if w.ndim == 1 else w
    if self.rule == "gaussian":
      return gaussian_rule(cond, uncond, w)
    return linear_rule(cond, uncond, w, self.guide_what)


def gaussian_rule(c: Affine, u: Affine, w) -> Affine:
  s = jnp.square(jnp.minimum(c.scale / u.scale, 1.0))
  denom = 1.0 + w - w * s
  scale = c.scale / jnp.sqrt(denom)
  shift = ((1.0 + w) * c.shift - w * s * u.shift) / denom
  return Affine(shift=shift, scale=scale, log_scale=c.log_scale - 0.5 * jnp.log(denom))


def linear_rule(c: Affine, u: Affine, g, guide_what: str = "ab") -> Affine:
  log_scale = c.log_scale + g * (c.log_scale - u.log_scale) if "a" in guide_what else c.log_scale
  shift = c.shift + g * (c.shift - u.shift) if "b" in guide_what else c.shift
  scale = jnp.exp(log_scale) if "a" in guide_what else c.scale
  return Affine(shift=shift, scale=scale, log_scale=log_scale)
