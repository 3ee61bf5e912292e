"""Sampling (reverse, noise -> data): cached sequential inversion, guidance, Jacobi, denoising.

Everything here is a pure function of (variables, inputs); loops are `lax.scan` / `lax.while_loop`
over tokens and chunks, never Python loops per token. Blocks are inverted from the noise side (deep
block) to the data side. Inside a block, token n needs theta_n (from tokens < n):
  x_n = theta_n.shift + theta_n.scale * z_n.
With guidance the block runs on [cond; uncond] (2B rows); both halves are fed the same guided x.

Typical use (jit the whole thing):
  sampler = jax.jit(functools.partial(flows.reverse, model, guidance=Guidance(...), jacobi=None))
  x_tokens, info = sampler(variables, z, labels)

Per-block strategies (GS-Jacobi, arXiv 2505.12849): `jacobi` is None (every block sequential), one
`Jacobi` (every block), or a tuple with one entry per block (data side first): None = sequential for
that block, else its own `Jacobi` (segment size = block_size, threshold, iteration limit, initial
guess). Blocks that converge slowly under Jacobi are better sampled sequentially; `rank_blocks` and
`choose_strategies` pick the strategy of each block from a calibration run.

Sharded sampling runs under the train step's rules: call (trace) the jitted sampler inside
`parallel.sharding_context(mesh, rules)`; the activation constraints and the per-block KV caches
(`nn.KVCache`, cache_* names) then follow the one table. Outside a context everything is one device.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from starflow2_jax.errors import UserError
from starflow2_jax.flows.block import Affine, init_block_cache
from starflow2_jax.flows.guidance import Guidance
from starflow2_jax.flows.likelihood import log_prob
from starflow2_jax.flows.model import FlowModel
from starflow2_jax.flows.permutations import permute


# Initial guesses of the unknown tokens q+1 .. q+B-1 of a chunk (token q is exact from the cache):
#   noise         x = z (STARFlow's guess)
#   zeros         x = 0
#   first_affine  x = theta_q^{-1}(z): the affine map of the chunk's first token applied to every token
INITS = ("noise", "zeros", "first_affine")


@dataclasses.dataclass(frozen=True)
class Jacobi:
  """Block fixed-point decoding (STARFLOW2.md 7.3). threshold < 0 never stops early. block_size is the
  segment size (GS-Jacobi: segments are solved in turn, Jacobi inside a segment; the number of tokens
  is one segment: plain Jacobi)."""
  block_size: int = 16
  threshold: float = 1e-3
  max_iter: int = 32
  exact_cache: bool = True  # re-run each converged chunk once so the cache is exact
  init: str = "noise"  # initial guess, one of INITS

  def __post_init__(self):
    if self.block_size < 2:
      raise UserError(f"jacobi.block_size must be >= 2 (1 is sequential sampling), got "
                      f"{self.block_size}")
    if self.max_iter < 1:
      raise UserError(f"jacobi.max_iter must be >= 1, got {self.max_iter}")
    if self.init not in INITS:
      raise UserError(f"jacobi.init must be one of {INITS}, got {self.init!r}")


Strategy = Jacobi | None  # the inversion of one block: None = sequential


def block_strategies(jacobi, num_blocks: int) -> tuple[Strategy, ...]:
  """None | Jacobi | a sequence of one Strategy per block (data side first) -> a tuple per block."""
  if jacobi is None or isinstance(jacobi, Jacobi):
    return (jacobi,) * num_blocks
  strategies = tuple(jacobi)
  if len(strategies) != num_blocks or not all(s is None or isinstance(s, Jacobi) for s in strategies):
    raise UserError(f"per-block sampling strategies: expected {num_blocks} entries (one per block, data "
                    f"side first), each None (sequential) or a Jacobi, got {strategies!r}")
  return strategies


def noise(key: jax.Array, num: int, num_tokens: int, token_dim: int, temperature: float = 1.0,
          first_row: int = 0) -> jax.Array:
  """[num, T, D] standard normal noise * temperature; row r uses fold_in(key, first_row + r), so a
  row's noise does not depend on the batch it is drawn in."""
  rows = jnp.arange(num) + first_row
  draw = lambda r: jax.random.normal(jax.random.fold_in(key, r), (num_tokens, token_dim))
  return temperature * jax.vmap(draw)(rows)


class _BlockInverter:
  """The guided streaming functions of one block, closed over the model and variables."""

  def __init__(self, model: FlowModel, variables, index: int, batch: int, labels, context,
               uncond_context, guidance: Guidance):
    cfg = model.cfg
    self.cfg, self.index, self.batch = cfg, index, batch
    self.guided = cfg.is_conditional(index) and guidance.active
    self.guidance = guidance
    has_ctx = cfg.has_context(index)
    labels = labels if (cfg.is_conditional(index) and cfg.num_classes) else None
    context = context if has_ctx else None
    q_scale = None
    if self.guided:
      if labels is not None:
        labels = jnp.concatenate([labels, jnp.full_like(labels, -1)])
      if has_ctx:
        if uncond_context is None:
          raise ValueError("guidance with a context prefix needs uncond_context (the null prompt)")
        context = jnp.concatenate([context, uncond_context])
      q_scale = jnp.concatenate([jnp.ones((batch,)), jnp.full((batch,), 1.0 / guidance.attn_temp)])
    self.rows = 2 * batch if self.guided else batch
    self.context_len = context.shape[1] if context is not None else 0
    self._labels, self._context, self._q_scale = labels, context, q_scale
    self._model, self._variables = model, variables

  def init_cache(self):
    return init_block_cache(self.cfg, self.index, self.rows, self.context_len)

  def _dup(self, x):
    return jnp.concatenate([x, x]) if self.guided else x

  def start(self, cache):
    return self._model.apply(self._variables, self.index, cache, self._labels, self._context,
                             self._q_scale, method=FlowModel.block_start)

  def feed(self, cache, x, n0):
    return self._model.apply(self._variables, self.index, cache, self._dup(x), n0, self._labels,
                             self._q_scale, method=FlowModel.block_feed)

  def forward(self, x_block_order):
    """Full parallel forward on the (duplicated) partial sequence -> theta [rows, T, D]."""
    perm = self.cfg.permutations[self.index]
    x = permute(self._dup(x_block_order), perm)
    _, _, theta = self._model.apply(self._variables, self.index, x, self._labels, self._context,
                                    self._q_scale, method=FlowModel.block_forward)
    return theta

  def combine(self, theta: Affine, n) -> Affine:
    """theta [rows, k, D] for token indices n [k] -> the (guided) parameters [B, k, D]."""
    if not self.guided:
      return theta
    b = self.batch
    cond = Affine(*(a[:b] for a in theta))
    uncond = Affine(*(a[b:] for a in theta))
    w = self.guidance.weights(n, self.cfg.num_tokens, self.cfg.parametrisation)
    return self.guidance.combine(cond, uncond, w)


def invert_sequential(inv: _BlockInverter, zp):
  """zp [B, T, D] block order -> x [B, T, D] block order, one token per step with the KV cache.
  inv: any inverter with start / feed / combine / init_cache (`_BlockInverter`; generate.decode's
  shallow blocks of STARFlow2)."""
  cache, theta0 = inv.start(inv.init_cache())

  def step(carry, inputs):
    cache, theta = carry
    n, z_n = inputs
    x_n = inv.combine(theta, n[None]).inverse(z_n[:, None])
    cache, theta = inv.feed(cache, x_n, n)
    return (cache, theta), x_n[:, 0]

  t = zp.shape[1]
  _, xs = jax.lax.scan(step, (cache, theta0), (jnp.arange(t), jnp.swapaxes(zp, 0, 1)))
  return jnp.swapaxes(xs, 0, 1), None


def invert_jacobi(inv: _BlockInverter, zp, jac: Jacobi):
  """Chunked fixed-point inversion. Returns (x [B, T, D] block order, iterations [num_chunks])."""
  b, t, d = zp.shape
  bs = jac.block_size
  if t % bs:
    raise UserError(f"jacobi.block_size {bs} must divide the number of tokens {t}")
  cache, theta0 = inv.start(inv.init_cache())

  def chunk(carry, c):
    cache, theta_q = carry
    q = c * bs
    z_chunk = jax.lax.dynamic_slice_in_dim(zp, q, bs, axis=1)
    n = q + jnp.arange(bs)
    first = inv.combine(theta_q, n[:1])
    x_q = first.inverse(z_chunk[:, :1])
    rest = {"noise": lambda: z_chunk[:, 1:], "zeros": lambda: jnp.zeros_like(z_chunk[:, 1:]),
            "first_affine": lambda: first.inverse(z_chunk[:, 1:])}[jac.init]()
    guess = jnp.concatenate([x_q, rest], axis=1)
    base = cache.index

    def body(state):
      k, x_old, _, _ = state
      c2, th = inv.feed(cache.rewind(base), x_old[:, :-1], q)  # theta for tokens q+1 .. q+bs-1
      th_all = Affine(*(jnp.concatenate([a0, a1], axis=1) for a0, a1 in zip(theta_q, th)))
      x_new = inv.combine(th_all, n).inverse(z_chunk)
      delta = jnp.mean(jnp.square(x_new - x_old)) / jnp.maximum(jnp.mean(jnp.square(x_new)), 1e-30)
      return k + 1, x_new, delta, c2

    def cond(state):
      k, _, delta, _ = state
      return (k == 0) | ((delta >= jac.threshold) & (k < jac.max_iter))

    init = (jnp.zeros((), jnp.int32), guess, jnp.asarray(jnp.inf, zp.dtype), cache)
    k, x, _, stale_cache = jax.lax.while_loop(cond, body, init)
    if jac.exact_cache:
      cache, th = inv.feed(cache.rewind(base), x, q)
    else:  # reference behaviour: keep the last iteration's cache, computed from the previous iterate
      cache, th = inv.feed(stale_cache, x[:, -1:], q + bs - 1)
    theta_next = Affine(*(a[:, -1:] for a in th))
    return (cache, theta_next), (x, k)

  _, (xs, iters) = jax.lax.scan(chunk, (cache, theta0), jnp.arange(t // bs))
  return jnp.swapaxes(xs, 0, 1).reshape(b, t, d), iters


def reverse(model: FlowModel, variables, z, labels=None, context=None, uncond_context=None, *,
            guidance: Guidance | float = 0.0, jacobi=None):
  """Invert the whole stack: z [B, T, D] -> (x tokens [B, T, D], info).

  jacobi: None | Jacobi | one Strategy per block (module docstring).
  info["block_iters"]: per block (data side first) the iterations used per chunk [num_chunks], None
  for a sequential block (the convergence test is a reduction over the global batch, so every device
  runs the same count); info["jacobi_iters"]: those stacked [num_blocks, num_chunks] when one Jacobi
  serves every block.
  """
  cfg = model.cfg
  if not isinstance(guidance, Guidance):
    guidance = Guidance.for_model(cfg.parametrisation, float(guidance))
  strategies = block_strategies(jacobi, cfg.num_blocks)
  x = z.astype(cfg.flow_dtype)
  iters = [None] * cfg.num_blocks
  for i in reversed(range(cfg.num_blocks)):
    inv = _BlockInverter(model, variables, i, z.shape[0], labels, context, uncond_context, guidance)
    perm = cfg.permutations[i]
    zp = permute(x, perm)
    if strategies[i] is None:
      xp, _ = invert_sequential(inv, zp)
    else:
      xp, iters[i] = invert_jacobi(inv, zp, strategies[i])
    x = permute(xp, perm)
  if all(s is None for s in strategies):
    return x, {}
  info = {"block_iters": tuple(iters)}
  if isinstance(jacobi, Jacobi):
    info["jacobi_iters"] = jnp.stack(iters)
  return x, info


def rank_blocks(model: FlowModel, variables, z, labels=None, context=None, uncond_context=None, *,
                guidance: Guidance | float = 0.0, jacobi: Jacobi) -> jax.Array:
  """GS-Jacobi's convergence ranking: the mean fraction of `jacobi.max_iter` that Jacobi needs per
  chunk, per block [num_blocks] (data side first), from one calibration run with `jacobi` everywhere.
  A block near 1 converges slowly (sample it sequentially); near 1/max_iter it converges at once."""
  _, info = reverse(model, variables, z, labels, context, uncond_context, guidance=guidance,
                    jacobi=jacobi)
  return jnp.mean(info["jacobi_iters"].astype(jnp.float32), axis=1) / jacobi.max_iter


def choose_strategies(ranks, jacobi: Jacobi, sequential_above: float = 0.5) -> tuple[Strategy, ...]:
  """Per block: sequential where `rank_blocks` exceeds `sequential_above`, else `jacobi`."""
  return tuple(None if float(r) > sequential_above else jacobi for r in ranks)


def reverse_uncached(model: FlowModel, variables, z, labels=None, context=None, uncond_context=None,
                     *, guidance: Guidance | float = 0.0):
  """Reference sampler without a KV cache: recompute the block's full causal forward on the current
  partial sequence at every token. O(T) times the cost; used by tests and the benchmark."""
  cfg = model.cfg
  if not isinstance(guidance, Guidance):
    guidance = Guidance.for_model(cfg.parametrisation, float(guidance))
  x = z.astype(cfg.flow_dtype)
  for i in reversed(range(cfg.num_blocks)):
    inv = _BlockInverter(model, variables, i, z.shape[0], labels, context, uncond_context, guidance)
    perm = cfg.permutations[i]
    zp = permute(x, perm)

    def step(n, xp):
      theta = inv.forward(xp)
      th_n = Affine(*(jax.lax.dynamic_slice_in_dim(a, n, 1, axis=1) for a in theta))
      x_n = inv.combine(th_n, n[None]).inverse(jax.lax.dynamic_slice_in_dim(zp, n, 1, axis=1))
      return jax.lax.dynamic_update_slice_in_dim(xp, x_n, n, axis=1)

    xp = jax.lax.fori_loop(0, zp.shape[1], step, jnp.zeros_like(zp))
    x = permute(xp, perm)
  return x


def sample(model: FlowModel, variables, key, labels=None, *, num: int | None = None,
           guidance: Guidance | float = 0.0, jacobi=None, temperature: float = 1.0,
           context=None, uncond_context=None):
  """Draw tokens [N, T, D]: noise rows from fold_in(key, row), then `reverse`."""
  cfg = model.cfg
  if num is None:
    if labels is None:
      raise ValueError("sample: pass num= or labels")
    num = len(labels)
  z = noise(key, num, cfg.num_tokens, cfg.token_dim, temperature)
  labels = None if labels is None else jnp.asarray(labels, jnp.int32)
  x, _ = reverse(model, variables, z, labels, context, uncond_context, guidance=guidance,
                 jacobi=jacobi)
  return x


def denoise(model: FlowModel, variables, x, labels=None, context=None, noise_std: float | None = None):
  """One Tweedie step x + sigma^2 grad_x log p(x | c), log p summed per image (STARFLOW2.md 7.6)."""
  sigma = model.cfg.noise_std if noise_std is None else noise_std

  def total_log_prob(x):
    return jnp.sum(log_prob(model.apply(variables, x, labels, context)))

  return x + sigma ** 2 * jax.grad(total_log_prob)(x)
