"""Sampling (reverse, noise -> data): cached sequential inversion, guidance, Jacobi, denoising.

Everything here is a pure function of (variables, inputs); loops are `lax.scan` / `lax.while_loop`
over tokens and chunks, never Python loops per token. Blocks are inverted from the noise side (deep
block) to the data side. Inside a block, token n needs theta_n (from tokens < n):
  x_n = theta_n.shift + theta_n.scale * z_n.
With guidance the block runs on [cond; uncond] (2B rows); both halves are fed the same guided x.

Typical use (jit the whole thing):
  sampler = jax.jit(functools.partial(flows.reverse, model, guidance=Guidance(...), jacobi=None))
  x_tokens, info = sampler(variables, z, labels)

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


@dataclasses.dataclass(frozen=True)
class Jacobi:
  """Block fixed-point decoding (STARFLOW2.md 7.3). threshold < 0 never stops early."""
  block_size: int = 16
  threshold: float = 1e-3
  max_iter: int = 32
  exact_cache: bool = True  # re-run each converged chunk once so the cache is exact

  def __post_init__(self):
    if self.block_size < 2:
      raise UserError(f"jacobi.block_size must be >= 2 (1 is sequential sampling), got "
                      f"{self.block_size}")
    if self.max_iter < 1:
      raise UserError(f"jacobi.max_iter must be >= 1, got {self.max_iter}")


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


def _invert_sequential(inv: _BlockInverter, zp):
  """zp [B, T, D] block order -> x [B, T, D] block order, one token per step with the KV cache."""
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


def _invert_jacobi(inv: _BlockInverter, zp, jac: Jacobi):
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
    x_q = inv.combine(theta_q, n[:1]).inverse(z_chunk[:, :1])
    guess = jnp.concatenate([x_q, z_chunk[:, 1:]], axis=1)  # STARFlow's initial guess: the noise
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
            guidance: Guidance | float = 0.0, jacobi: Jacobi | None = None):
  """Invert the whole stack: z [B, T, D] -> (x tokens [B, T, D], info).

  info["jacobi_iters"]: [num_blocks, num_chunks] iterations used per chunk (Jacobi only; the
  convergence test is a reduction over the global batch, so every device runs the same count).
  """
  cfg = model.cfg
  if not isinstance(guidance, Guidance):
    guidance = Guidance.for_model(cfg.parametrisation, float(guidance))
  x = z.astype(cfg.flow_dtype)
  iters = []
  for i in reversed(range(cfg.num_blocks)):
    inv = _BlockInverter(model, variables, i, z.shape[0], labels, context, uncond_context, guidance)
    perm = cfg.permutations[i]
    zp = permute(x, perm)
    if jacobi is None:
      xp, it = _invert_sequential(inv, zp)
    else:
      xp, it = _invert_jacobi(inv, zp, jacobi)
      iters.append(it)
    x = permute(xp, perm)
  info = {"jacobi_iters": jnp.stack(iters[::-1])} if iters else {}
  return x, info


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
           guidance: Guidance | float = 0.0, jacobi: Jacobi | None = None, temperature: float = 1.0,
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
