"""The STARFlow2 losses as (sum, count) terms over the global batch (STARFLOW2.md 5.1-5.3).

Flow loss of image i (N latents of D_tok channels; every block's log-det a per-dimension mean):
  L_NF^(i) = mean_{n,c} [ 0.5 z^2 + log sigma^D + sum_k log sigma^{S_k} ]
  L_NF = mean over the flow-loss images I of the global batch  ->  term "nf" = (sum_i L_NF^(i)
  + latent_norm_reg * sum_k mean_{n,c} (u^{S_k})^2, |I|)   (the regulariser over every shallow output)
  reported: "latent_nll" = (sum_i L_NF^(i) + 0.5 log 2 pi, |I|)  nats/dim.
Text loss: token mean over the supervised positions S of the global batch (logits float32; vocabulary
rows at or past the tokenizer's size are never predicted):
  "ntp" = (sum_{(b,t) in S} -log softmax(logits_{b,t})[targets_{b,t}], |S|).
The train step divides each global sum by its global count, so both means are exact under any mesh
and any gradient accumulation. A count of zero (a batch without flow-loss images, or without
supervised text) is reported as 1: its sum is 0 too, so the term is 0, never NaN.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from starflow2_jax.pretzel.model import PretzelOutput

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def image_nll(out: PretzelOutput) -> jax.Array:
  """[B, I] L_NF^(i) (without 0.5 log 2 pi), float32 (float64 in x64 tests)."""
  dt = jnp.promote_types(out.z.dtype, jnp.float32)
  per = 0.5 * jnp.square(out.z.astype(dt)) - out.deep_logdet.astype(dt)
  for ld in out.shallow_logdets:
    per = per - ld.astype(dt)
  return jnp.mean(per, axis=(2, 3))


def latent_norm(out: PretzelOutput) -> jax.Array:
  """[B, I] sum over the shallow blocks of mean_{n,c} u_k^2 (STARFlow's regulariser term)."""
  terms = [jnp.mean(jnp.square(u), axis=(2, 3)) for u in out.shallow_outputs]
  return sum(terms) if terms else jnp.zeros(out.u.shape[:2], out.u.dtype)


def text_ce(logits: jax.Array, targets: jax.Array, text_vocab: int) -> jax.Array:
  """[B, L] -log softmax(logits)[targets] in float32, rows >= text_vocab masked out of the softmax."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if text_vocab < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < text_vocab, logits, -jnp.inf)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def per_example(out: PretzelOutput, batch: dict, text_vocab: int, latent_norm_reg: float,
                with_flow: bool = True, with_text: bool = True) -> dict:
  """{term: (sum [B], count [B])} per row: "nf", "latent_nll" (with_flow) and "ntp" (with_text).

  batch: image_flow_loss bool [B, I] (and image_valid), targets int [B, L], target_mask bool [B, L]."""
  terms = {}
  if with_flow:
    flow = batch["image_flow_loss"] & batch["image_valid"]
    nll = image_nll(out)
    obj = nll + latent_norm_reg * latent_norm(out) if latent_norm_reg else nll
    count = jnp.sum(flow, axis=1, dtype=nll.dtype)
    terms["nf"] = (jnp.sum(jnp.where(flow, obj, 0.0), axis=1), count)
    terms["latent_nll"] = (jnp.sum(jnp.where(flow, nll + HALF_LOG_2PI, 0.0), axis=1), count)
  if with_text:
    mask = batch["target_mask"]
    ce = text_ce(out.logits, batch["targets"], text_vocab)
    terms["ntp"] = (jnp.sum(jnp.where(mask, ce, 0.0), axis=1), jnp.sum(mask, axis=1, dtype=ce.dtype))
  return terms


def batch_terms(per_row: dict) -> dict:
  """Per-row (sum [B], count [B]) -> batch (sum, max(count, 1)) float scalars for `train.step`."""
  return {k: (jnp.sum(s), jnp.maximum(jnp.sum(c), 1.0)) for k, (s, c) in per_row.items()}
