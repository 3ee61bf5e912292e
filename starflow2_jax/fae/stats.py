"""Per-channel statistics of the FAE's posterior-mean latents (STARFLOW2.md 6.2).

After training, the mean m_c and std s_c of the raw posterior mean z over every latent position of up
to `fae.stats_images` training images are stored as params["latent_stats"] = {"mean", "std"} [C]; the
flow then sees (z - m) / s. Sums are accumulated in float64 on the host, so the result does not depend
on the batching (`train.fae_task.latent_stats` feeds it the posterior means of each global batch).
"""
from __future__ import annotations

import numpy as np

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
