"""Frechet distance against closed forms (float64), FID of a set against itself, streaming statistics
and pytorch-fid's .npz statistics files."""
import numpy as np
import pytest
import scipy.linalg

from starflow2_jax.errors import UserError
from starflow2_jax.eval import frechet


def _rotation(f, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(f, f)))
  return q


def test_diagonal_gaussians_closed_form():
  rng = np.random.default_rng(0)
  f = 16
  mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
  a, b = rng.uniform(0.1, 3, f), rng.uniform(0.1, 3, f)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
  # a common rotation leaves the distance unchanged (the covariances are no longer diagonal)
  r = _rotation(f, 1)
  got = frechet.frechet_distance(r @ mu1, r @ np.diag(a) @ r.T, r @ mu2, r @ np.diag(b) @ r.T)
  assert got == pytest.approx(want, rel=1e-10)


def test_identity_against_any_covariance_and_scipy_sqrtm():
  rng = np.random.default_rng(2)
  f = 12
  m = rng.normal(size=(f, f))
  s2 = m @ m.T / f  # full, non-commuting with a general s1
  w = np.linalg.eigvalsh(s2)
  want = f + np.trace(s2) - 2 * np.sum(np.sqrt(w))  # tr((I s2)^1/2) = sum sqrt(eig(s2))
  assert frechet.frechet_distance(np.zeros(f), np.eye(f), np.zeros(f), s2) == pytest.approx(want, rel=1e-11)
  s1 = np.cov(rng.normal(size=(50, f)), rowvar=False)
  ref = np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
  assert frechet.frechet_distance(np.zeros(f), s1, np.zeros(f), s2) == pytest.approx(ref, rel=1e-9)


def test_a_set_against_itself_is_zero():
  full = np.random.default_rng(3).normal(size=(200, 16))
  mu, sigma = frechet.statistics(full)
  assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)
  # N < F: a singular covariance (as FID on few samples): round-off of the null space stays ~1e-8
  few = np.random.default_rng(3).normal(size=(20, 64))
  mu, sigma = frechet.statistics(few)
  assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-7 * np.trace(sigma)


def test_running_statistics_equal_numpy_cov():
  feats = np.random.default_rng(4).normal(size=(37, 8)) * 3 + 5
  run = frechet.RunningStatistics(8)
  for chunk in np.array_split(feats, 4):
    run.update(chunk)
  mu, sigma = run.result()
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)


def test_statistics_files_round_trip_and_errors(tmp_path):
  mu, sigma = frechet.statistics(np.random.default_rng(5).normal(size=(10, 4)))
  path = frechet.save_statistics(str(tmp_path / "ref.npz"), mu, sigma)
  with np.load(path) as f:  # the keys pytorch-fid reads
    assert sorted(f.files) == ["mu", "sigma"]
  got_mu, got_sigma = frechet.load_statistics(path)
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    frechet.save_statistics(path, mu, sigma)
  with pytest.raises(FileNotFoundError, match="reference statistics .*missing.npz not found"):
    frechet.load_statistics(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "bad.npz", m=mu)
  with pytest.raises(UserError, match=r"needs arrays \['mu', 'sigma'\], missing \['mu', 'sigma'\]"):
    frechet.load_statistics(str(tmp_path / "bad.npz"))
  with pytest.raises(UserError, match=r"sigma2 must have shape \[4, 4\].*same network"):
    frechet.frechet_distance(mu, sigma, mu, np.eye(3))


@pytest.mark.parametrize("n", [5, 40])  # fewer samples than features (the N x N path), and more
def test_distance_to_features_equals_the_statistics_form(n):
  rng = np.random.default_rng(6)
  feats = rng.normal(size=(n, 16)) * rng.uniform(0.5, 2, 16)
  mu_ref, sigma_ref = frechet.statistics(rng.normal(size=(60, 16)) + 0.3)
  want = frechet.frechet_distance(*frechet.statistics(feats), mu_ref, sigma_ref)
  # the F x F form carries ~1e-8 round-off from the singular sample covariance's null space
  assert frechet.frechet_distance_to_features(feats, mu_ref, sigma_ref) == pytest.approx(want, rel=1e-7)
  mu, sigma = frechet.statistics(feats)
  assert abs(frechet.frechet_distance_to_features(feats, mu, sigma)) < 1e-7 * np.trace(sigma)
