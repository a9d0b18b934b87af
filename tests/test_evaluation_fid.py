"""The Fréchet distance, feature statistics and the Inception Score, against closed forms."""

import math

import numpy as np
import pytest
import scipy.linalg

from ddpm_jax.evaluation import fid

# -- Fréchet distance. -------------------------------------------------------------------------


def _random_spd(rng, dim, scale=1.0):
  a = rng.standard_normal((dim, dim))
  return scale * (a @ a.T / dim + 0.1 * np.eye(dim))


def _psd_sqrt_by_eigh(matrix):
  """Independent PSD square root: V diag(sqrt(lambda)) V^T."""
  w, v = np.linalg.eigh(matrix)
  return v @ np.diag(np.sqrt(np.maximum(w, 0))) @ v.T


def _closed_form_fid(mu1, s1, mu2, s2):
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^(1/2) S2 S1^(1/2))^(1/2)) by eigendecompositions."""
  r1 = _psd_sqrt_by_eigh(s1)
  cross = _psd_sqrt_by_eigh(r1 @ s2 @ r1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def test_fid_of_a_set_against_itself_is_zero():
  features = np.random.default_rng(0).standard_normal((400, 32)) * 3 + 1
  mu, sigma = fid.compute_statistics(features)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
  assert abs(fid.fid_from_features(features, features.copy())) < 1e-6


def test_compute_statistics_is_mean_and_unbiased_covariance():
  features = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
  mu, sigma = fid.compute_statistics(features)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (4, 4)
  centred = features.astype(np.float64) - features.astype(np.float64).mean(0)
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
  with pytest.raises(ValueError, match="N >= 2"):
    fid.compute_statistics(features[:1])


def test_fid_of_diagonal_gaussians_matches_closed_form():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  a, b = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-10)
  # Commuting (same eigenbasis) covariances: the same formula on the eigenvalues.
  q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-8)
  # Scalar case: (mu1 - mu2)^2 + (s1 - s2)^2 for standard deviations s.
  assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_general_gaussians_matches_eigendecomposition_form(method):
  rng = np.random.default_rng(3)
  dim = 20
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim, scale=2.0)
  expected = _closed_form_fid(mu1, s1, mu2, s2)
  assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)
  assert fid.frechet_distance(mu2, s2, mu1, s1, method=method) == pytest.approx(expected, rel=1e-9)


def test_sqrtm_psd_matches_scipy():
  rng = np.random.default_rng(4)
  matrix = _random_spd(rng, 30)
  root = fid.sqrtm_psd(matrix)
  np.testing.assert_allclose(root, scipy.linalg.sqrtm(matrix).real, atol=1e-10)
  np.testing.assert_allclose(root @ root, matrix, atol=1e-10)
  np.testing.assert_allclose(root, root.T, atol=1e-12)
  s2 = _random_spd(rng, 30)
  expected = np.trace(scipy.linalg.sqrtm(matrix @ s2)).real
  assert fid.trace_sqrt_product_eigh(matrix, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_with_singular_covariances_stays_finite():
  rng = np.random.default_rng(5)
  # 20 samples in 50 dimensions: both covariances have rank 19.
  f1, f2 = rng.standard_normal((20, 50)), rng.standard_normal((20, 50)) + 0.5
  mu1, s1 = fid.compute_statistics(f1)
  mu2, s2 = fid.compute_statistics(f2)
  value = fid.frechet_distance(mu1, s1, mu2, s2)
  exact = fid.frechet_distance(mu1, s1, mu2, s2, method="eigh")
  assert math.isfinite(value) and value > 0
  assert value == pytest.approx(exact, rel=0.05)
  mu, s = fid.compute_statistics(f1)
  assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-2 * np.trace(s)


def test_fid_falls_back_to_eps_offset_when_sqrtm_fails(monkeypatch):
  rng = np.random.default_rng(6)
  s1, s2 = _random_spd(rng, 5), _random_spd(rng, 5)
  mu = np.zeros(5)
  real_sqrtm, calls = scipy.linalg.sqrtm, []

  def failing_first(matrix):
    calls.append(matrix)
    return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

  monkeypatch.setattr(scipy.linalg, "sqrtm", failing_first)
  value = fid.frechet_distance(mu, s1, mu, s2, eps=1e-3)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(5)) @ (s2 + 1e-3 * np.eye(5)))
  # As in TTUR, the offset enters only the square root, not Tr(S1) + Tr(S2).
  offset = 1e-3 * np.eye(5)
  expected = _closed_form_fid(mu, s1 + offset, mu, s2 + offset) - 2 * np.trace(offset)
  assert value == pytest.approx(expected, rel=1e-9)


def test_fid_rejects_large_imaginary_parts_and_bad_shapes(monkeypatch):
  eye = np.eye(3)
  monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: m + 1j * np.eye(len(m)))
  with pytest.raises(ValueError, match="imaginary"):
    fid.frechet_distance(np.zeros(3), eye, np.zeros(3), eye)
  monkeypatch.undo()
  with pytest.raises(ValueError, match="Mismatched"):
    fid.frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))


def test_statistics_round_trip(tmp_path):
  rng = np.random.default_rng(7)
  mu, sigma = rng.standard_normal(8), _random_spd(rng, 8)
  path = str(tmp_path / "sub" / "stats.npz")
  fid.save_statistics(path, mu, sigma)
  mu2, sigma2 = fid.load_statistics(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  np.savez(tmp_path / "other.npz", x=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    fid.load_statistics(str(tmp_path / "other.npz"))


# -- Inception Score. --------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
  mean, std = fid.inception_score(np.zeros((100, 1008)))
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("num_classes", [10, 1008])
def test_inception_score_of_confident_balanced_predictions_is_num_classes(num_classes):
  n = num_classes * 10
  labels = np.arange(n) % num_classes  # Every consecutive split holds each class equally often.
  logits = 100.0 * np.eye(num_classes)[labels]
  mean, std = fid.inception_score(logits, num_splits=10)
  assert mean == pytest.approx(num_classes, rel=1e-6) and std == pytest.approx(0, abs=1e-6)
  # One class only: no diversity, IS = 1.
  assert fid.inception_score(100.0 * np.eye(num_classes)[np.zeros(n, int)])[0] == pytest.approx(1)


def test_inception_score_matches_entropy_form():
  """IS = exp(H(p(y)) - E_x H(p(y|x))) per split, computed with scipy on random logits; splits
  at OpenAI's boundaries i * N // splits (301 -> 100, 100, 101, unlike np.array_split)."""
  from scipy import special, stats

  logits = np.random.default_rng(8).standard_normal((301, 7)) * 2
  probs = special.softmax(logits, axis=1)
  scores = [
    np.exp(stats.entropy(part.mean(0)) - np.mean([stats.entropy(p) for p in part]))
    for part in (probs[:100], probs[100:200], probs[200:])
  ]
  mean, std = fid.inception_score(logits, num_splits=3)
  assert mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-8)
