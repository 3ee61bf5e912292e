"""What happens to an image span outside the generation loop (STARFLOW2.md 7.5, 7.6, 6.2, 7.9).
B images of N latent tokens of D = D_tok channels, S the FAE's pixel side.

  shallow_inverse  u (the deep input the loop generated) -> x, inverting shallow_{K-1} .. shallow_0,
                   each autoregressive in its own order with its own SOS and small KV cache, by the
                   flow core's sequential or Jacobi inversion (`flows.sampling`); unguided, image-local
  score_denoise    one Tweedie step x + sigma_n^2 grad_x log p(x | C), log p the image's SUMMED density
                   under the model (shallow blocks, deep stream and VLM stream at its positions) with the
                   real prompt, unguided; the rest of the sequence is held fixed
  to_pixels        x (normalised latent tokens) -> FAE decode -> images [B, S, S, 3] in [0, 1]
  input_latents    understanding inputs: FAE encode -> + sigma_n eps (seeded) -> patchify -> shallow
                   forward -> u
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from starflow2_jax.flows.block import init_block_cache
from starflow2_jax.flows.patchify import patchify, unpatchify
from starflow2_jax.flows.permutations import permute
from starflow2_jax.flows.sampling import Jacobi, invert_jacobi, invert_sequential
from starflow2_jax.pretzel import model as pmodel
from starflow2_jax.pretzel.model import Pretzel

DENOISE = ("score", "none")


class _ShallowInverter:
  """Shallow block k of a Pretzel as the inverter interface of `flows.sampling` (start, feed, combine,
  init_cache); unguided."""

  def __init__(self, model: Pretzel, params, k: int, batch: int):
    self.model, self.variables, self.k, self.batch = model, {"params": params}, k, batch
    self.fcfg = model.cfg.shallow_flow()

  def init_cache(self):
    return init_block_cache(self.fcfg, self.k, self.batch)

  def start(self, cache):
    return self.model.apply(self.variables, cache, method=lambda m, c: m.shallow[self.k].start(c))

  def feed(self, cache, x, n0):
    return self.model.apply(self.variables, cache, x, n0,
                            method=lambda m, c, x, n: m.shallow[self.k].feed(c, x, n))

  def combine(self, theta, n):
    return theta


def shallow_inverse(model: Pretzel, params, u: jax.Array, jacobi: Jacobi | None = None):
  """u [B, N, D] -> (x [B, N, D], Jacobi iterations [K, chunks] or None)."""
  cfg = model.cfg
  perms = cfg.shallow_flow().permutations
  x = u.astype(cfg.flow_dtype)
  iters = []
  for k in reversed(range(cfg.shallow_blocks)):
    inv = _ShallowInverter(model, params, k, x.shape[0])
    zp = permute(x, perms[k])
    if jacobi is None:
      xp, _ = invert_sequential(inv, zp)
    else:
      xp, it = invert_jacobi(inv, zp, jacobi)
      iters.append(it)
    x = permute(xp, perms[k])
  return x, (jnp.stack(iters[::-1]) if iters else None)


def image_log_density(model: Pretzel, params, vlm, vlm_params, inputs: dict, u_all, slot: int, x):
  """log p(x | C) [B] summed over the image in slot `slot` (the constant -N D log(2 pi)/2 dropped):
  x [B, N, D] replaces that image (u = f_S(x)); u_all [B, I, N, D] holds the others."""
  u_x, logdets, _ = model.apply({"params": params}, x[:, None], method=Pretzel.shallow_forward)
  u = u_all.astype(u_x.dtype).at[:, slot].set(u_x[:, 0])
  out = pmodel.forward_from_u(model, params, vlm, vlm_params, inputs, u, "nf")
  terms = -0.5 * jnp.square(out.z[:, slot]) + out.deep_logdet[:, slot] + sum(ld[:, 0] for ld in logdets)
  return jnp.sum(terms, axis=(1, 2))


def score_denoise(model: Pretzel, params, vlm, vlm_params, inputs: dict, u_all, slot: int, x,
                  noise_std: float | None = None):
  """One Tweedie step on image `slot`: x [B, N, D] -> x + sigma_n^2 grad_x log p(x | C) (rows
  independent: the gradient of the sum over rows is each row's own)."""
  sigma = model.cfg.noise_std if noise_std is None else noise_std
  def total(x):
    return jnp.sum(image_log_density(model, params, vlm, vlm_params, inputs, u_all, slot, x))
  return x + sigma ** 2 * jax.grad(total)(x)


def to_pixels(model: Pretzel, fae, fae_params, x: jax.Array) -> jax.Array:
  """Normalised latent tokens x [B, N, D] -> images float32 [B, S, S, 3] in [0, 1]."""
  cfg = model.cfg
  h, w = cfg.latent_grid
  grid = unpatchify(x.astype(jnp.float32), cfg.latent_patch, "starflow", (h, w, cfg.latent_channels))
  return fae.decode(fae_params, grid)


def input_latents(model: Pretzel, params, fae, fae_params, images, rng: jax.Array, noise: bool = True):
  """Understanding inputs: uint8 images [B, S, S, 3] -> u [B, 1, N, D]. Row b's noise is
  normal(fold_in(rng, b)) * noise_std (vlm.understanding_noise: the model never saw clean latents)."""
  cfg = model.cfg
  z = fae.encode(fae_params, images).astype(cfg.flow_dtype)
  if noise:
    eps = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(rng, r), z.shape[1:], z.dtype))(
        jnp.arange(z.shape[0]))
    z = z + cfg.noise_std * eps
  x = patchify(z, cfg.latent_patch, "starflow")
  u, _, _ = model.apply({"params": params}, x[:, None], method=Pretzel.shallow_forward)
  return u
