"""Per-channel statistics of the FAE's posterior-mean latents (STARFLOW2.md 6.2).

After training, the mean m_c and std s_c of the raw posterior mean z over every latent position of up
to `fae.stats_images` training images are stored as params["latent_stats"] = {"mean", "std"} [C]; the
flow then sees (z - m) / s. Sums are accumulated in float64 on the host, so the result does not depend
on the batching.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.fae.model import FAE

MIN_STD = 1e-6  # a channel that never varies is normalised by this instead of 0


class LatentMoments:
  """Running float64 count, sum and sum of squares per channel of latents [..., C]."""

  def __init__(self, channels: int):
    self.n = 0
    self.s = np.zeros(channels, np.float64)
    self.s2 = np.zeros(channels, np.float64)

  def add(self, z: np.ndarray) -> None:
    z = np.asarray(z, np.float64).reshape(-1, self.s.shape[0])
    self.n += z.shape[0]
    self.s += z.sum(0)
    self.s2 += np.square(z).sum(0)

  def result(self) -> dict[str, np.ndarray]:
    if self.n == 0:
      raise ValueError("latent statistics over no latents")
    mean = self.s / self.n
    var = np.maximum(self.s2 / self.n - np.square(mean), 0.0)
    return {"mean": mean.astype(np.float32),
            "std": np.maximum(np.sqrt(var), MIN_STD).astype(np.float32)}


def posterior_mean_fn(fae: FAE):
  """jitted (params, images uint8 [B, S, S, 3]) -> raw posterior mean [B, N, C]."""
  def fn(params, images):
    return fae.posterior(params, fae.trunk_features(params["trunk"], images))[0]
  return jax.jit(fn)


def compute_latent_stats(fae: FAE, params, image_batches: Iterable[np.ndarray]) -> dict[str, jax.Array]:
  """{"mean", "std"} float32 [C] over every latent of every image in `image_batches` (uint8 arrays
  [b, S, S, 3]); params need no statistics."""
  moments = LatentMoments(fae.channels)
  fn = posterior_mean_fn(fae)
  for images in image_batches:
    moments.add(np.asarray(fn(params, jnp.asarray(images))))
  return {k: jnp.asarray(v) for k, v in moments.result().items()}
