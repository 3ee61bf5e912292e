"""Cached text generation: prefill + decode in one jitted function, the loop a `lax.while_loop`.

Prompts are left-padded to a common length L (pads: valid = False, position 0), so the last prompt column
is a real token in every row and decode steps write one column for the whole batch. Each row carries its
own next M-RoPE position (`next_position` from `positions.mrope_positions`). The KV cache
(L + max_new_tokens slots) is allocated inside the jit and carried by the loop, which XLA updates in
place. Sampling: greedy (temperature 0), temperature, top-k, top-p; ids >= `vocab_limit` (embedding
padding rows) are never sampled. Rows stop at any id in `eos_ids`; finished rows emit `pad_id`.

Sharded generation runs under the train step's rules: call `generate` / `jitted_step` inside
`parallel.sharding_context(mesh, rules)` (as `vlm.chat` does); the activation constraints and the cache
buffers (cache_* logical names) then follow the one table. Outside a context: one device.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from starflow2_jax.nn.attention import KVCache
from starflow2_jax.vlm.model import Qwen2_5_VL


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 512
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  vocab_limit: int | None = None  # ids >= this are masked (None = the whole embedding)


def filter_top_k(logits: jax.Array, k: int) -> jax.Array:
  """Keep the k largest logits of each row [..., V], set the rest to -inf."""
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits: jax.Array, p: float) -> jax.Array:
  """Keep the smallest probability-sorted prefix whose mass reaches p (ties broken by id), -inf
  elsewhere. logits [..., V]."""
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, -1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, -1) - probs
  keep_sorted = mass_before < p
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), -1)
  return jnp.where(keep, logits, -jnp.inf)


def sample_token(logits: jax.Array, rng: jax.Array, s: SamplingConfig) -> jax.Array:
  """logits [B, V] float32 -> token ids [B] int32."""
  if s.vocab_limit is not None and s.vocab_limit < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < s.vocab_limit, logits, -jnp.inf)
  if s.temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / s.temperature
  if s.top_k:
    logits = filter_top_k(logits, s.top_k)
  if s.top_p < 1.0:
    logits = filter_top_p(logits, s.top_p)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


def step(model: Qwen2_5_VL, params, cache: KVCache, tokens: jax.Array, positions: jax.Array,
         valid: jax.Array | None = None, image_embeds=None, image_index=None):
  """One cached call (prefill: T = prompt length; decode: T = 1).

  tokens [B, T], positions [B, T, 3] -> (logits of the last column [B, V] float32, new cache)."""
  out = model.apply({"params": params}, tokens, positions=positions, valid=valid, cache=cache,
                    image_embeds=image_embeds, image_index=image_index)
  return out["logits"][:, -1], out["cache"]


# The cache is donated: the update is written into the caller's buffers.
jitted_step = jax.jit(step, static_argnums=0, donate_argnames="cache")


@functools.partial(jax.jit, static_argnames=("model", "sampling", "return_logits"))
def generate(model: Qwen2_5_VL, params, tokens: jax.Array, valid: jax.Array, positions: jax.Array,
             next_position: jax.Array, rng: jax.Array, sampling: SamplingConfig,
             image_embeds: jax.Array | None = None, image_index: jax.Array | None = None,
             return_logits: bool = False) -> dict:
  """Generate up to sampling.max_new_tokens tokens after left-padded prompts.

  tokens, valid [B, L]; positions [B, L, 3]; next_position [B]; image_embeds [M, d] with image_index
  [B, L] (row of image_embeds for image positions, -1 elsewhere) or None.
  Returns {"tokens": [B, N] int32 (pad_id after a row ends), "lengths": [B] (EOS included),
  "logits": [B, N, V] float32 (the distribution each token was drawn from; only if return_logits)}.
  """
  b, length = tokens.shape
  n = sampling.max_new_tokens
  cache = model.cfg.init_cache(b, length + n)
  logits, cache = step(model, params, cache, tokens, positions, valid, image_embeds, image_index)
  eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)
  vocab = logits.shape[-1]
  init = dict(i=jnp.zeros((), jnp.int32), cache=cache, logits=logits, done=jnp.zeros((b,), bool),
              out=jnp.full((b, n), sampling.pad_id, jnp.int32), lengths=jnp.zeros((b,), jnp.int32),
              rng=rng)
  if return_logits:
    init["history"] = jnp.zeros((b, n, vocab), jnp.float32)

  def cond(s):
    return (s["i"] < n) & ~jnp.all(s["done"])

  def body(s):
    rng, key = jax.random.split(s["rng"])
    tok = sample_token(s["logits"], key, sampling)
    tok = jnp.where(s["done"], sampling.pad_id, tok)
    new = dict(s, rng=rng, out=s["out"].at[:, s["i"]].set(tok),
               lengths=s["lengths"] + (~s["done"]).astype(jnp.int32),
               done=s["done"] | jnp.isin(tok, eos), i=s["i"] + 1)
    if return_logits:
      new["history"] = s["history"].at[:, s["i"]].set(s["logits"])
    pos = jnp.broadcast_to((next_position + s["i"])[:, None, None], (b, 1, 3))
    new["logits"], new["cache"] = step(model, params, s["cache"], tok[:, None], pos)
    return new

  final = jax.lax.while_loop(cond, body, init)
  result = {"tokens": final["out"], "lengths": final["lengths"]}
  if return_logits:
    result["logits"] = final["history"]
  return result
