"""The Frechet distance between Gaussians fitted to features, and pytorch-fid's statistics files.

  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

computed in float64 NumPy. The trace term uses tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2),
both square roots of symmetric positive semi-definite matrices taken by `eigh` (eigenvalues clipped
at 0 against round-off): exact where pytorch-fid's `scipy.linalg.sqrtm` of the non-symmetric product
needs an epsilon retry and discards imaginary parts.

Statistics files: `.npz` with `mu` [F] and `sigma` [F, F] (float64), the format pytorch-fid's
`--save-stats` writes and `calculate_fid_given_paths` reads; `sigma` is the unbiased (ddof=1)
covariance, as `np.cov(features, rowvar=False)`.
"""
from __future__ import annotations

import os

import numpy as np

from starflow2_jax.errors import UserError

STATS_KEYS = ("mu", "sigma")


def _symmetrise(m: np.ndarray) -> np.ndarray:
  return (m + m.T) / 2


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root of a symmetric matrix [F, F] (float64)."""
  w, v = np.linalg.eigh(_symmetrise(m))
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): mu [F], sigma [F, F]."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  f = mu1.shape[0]
  for name, a, shape in (("mu1", mu1, (f,)), ("mu2", mu2, (f,)), ("sigma1", sigma1, (f, f)),
                         ("sigma2", sigma2, (f, f))):
    if a.shape != shape:
      raise UserError(f"frechet_distance: {name} must have shape {list(shape)} (feature size of mu1), "
                      f"found {list(a.shape)}: are both statistics from the same network?")
  root1 = _psd_sqrt(sigma1)
  inner = np.linalg.eigvalsh(_symmetrise(root1 @ sigma2 @ root1))
  trace_sqrt = float(np.sum(np.sqrt(np.clip(inner, 0.0, None))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance_to_features(features, mu_ref, sigma_ref) -> float:
  """`frechet_distance(*statistics(features), mu_ref, sigma_ref)` without forming the sample
  covariance when there are fewer samples than features: with Y = (features - mean) / sqrt(N - 1)
  [N, F], the non-zero eigenvalues of S Sref = Y^T Y Sref are those of the symmetric PSD Y Sref Y^T
  [N, N], so tr((S Sref)^(1/2)) costs an N x N eigendecomposition instead of two F x F ones."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise UserError(f"statistics need features [N >= 2, F], found shape {list(x.shape)}")
  n, f = x.shape
  if n - 1 >= f:
    return frechet_distance(*statistics(x), mu_ref, sigma_ref)
  mu = x.mean(axis=0)
  mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
  if mu_ref.shape != (f,) or sigma_ref.shape != (f, f):
    raise UserError(f"reference statistics of {list(mu_ref.shape)} features do not match samples of "
                    f"{f} features: are both from the same network?")
  y = (x - mu) / np.sqrt(n - 1)
  inner = np.linalg.eigvalsh(_symmetrise(y @ sigma_ref @ y.T))
  trace_sqrt = float(np.sum(np.sqrt(np.clip(inner, 0.0, None))))
  diff = mu - mu_ref
  return float(diff @ diff + np.sum(y * y) + np.trace(sigma_ref) - 2.0 * trace_sqrt)


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """features [N, F] -> (mu [F], sigma [F, F]) in float64, sigma unbiased (N >= 2)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise UserError(f"statistics need features [N >= 2, F], found shape {list(x.shape)}")
  return x.mean(axis=0), np.cov(x, rowvar=False)


class RunningStatistics:
  """Accumulates float64 sums of features [n, F] batch by batch; `result()` -> (mu, sigma) equal to
  `statistics` of all rows (memory O(F^2) whatever N)."""

  def __init__(self, num_features: int):
    self.count = 0
    self.total = np.zeros((num_features,), np.float64)
    self.outer = np.zeros((num_features, num_features), np.float64)

  def update(self, features) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.total.shape[0]:
      raise ValueError(f"expected features [n, {self.total.shape[0]}], got {list(x.shape)}")
    self.count += x.shape[0]
    self.total += x.sum(axis=0)
    self.outer += x.T @ x

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    n = self.count
    if n < 2:
      raise UserError(f"statistics need at least 2 samples, got {n}")
    mu = self.total / n
    sigma = (self.outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, _symmetrise(sigma)


def save_statistics(path: str, mu, sigma) -> str:
  """Write a new pytorch-fid statistics file (never over an existing one). Returns its path."""
  path = os.path.abspath(os.path.expanduser(path))
  if not path.endswith(".npz"):
    raise UserError(f"statistics file {path}: the name must end in .npz (numpy adds it otherwise)")
  if os.path.exists(path):
    raise FileExistsError(f"refusing to overwrite statistics file {path}: choose a new name")
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
  return path


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Read (mu [F], sigma [F, F]) from a pytorch-fid `.npz` statistics file."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"reference statistics {path} not found: write them with launch.evaluate "
        "--metric=fid --images=DIR --save_stats=FILE.npz (or pytorch-fid --save-stats)")
  with np.load(path) as f:
    missing = [k for k in STATS_KEYS if k not in f.files]
    if missing:
      raise UserError(f"{path}: a statistics file needs arrays {list(STATS_KEYS)}, missing {missing} "
                      f"(found {sorted(f.files)})")
    mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise UserError(f"{path}: expected mu [F] and sigma [F, F], found {list(mu.shape)} and "
                    f"{list(sigma.shape)}")
  return mu, sigma
