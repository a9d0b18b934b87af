"""Fréchet Inception Distance and Inception Score from features (pure numpy/scipy, float64).

FID (Heusel et al. 2017, TTUR) between Gaussians fitted to two feature sets:
  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
The matrix square root follows TTUR's `calculate_frechet_distance` (also pytorch-fid's):
scipy.linalg.sqrtm of S1 @ S2, retried with eps * I added to both covariances when the result is
not finite or (our addition) does not square back to S1 @ S2 (a near-singular product, e.g. fewer
samples than dimensions), and a negligible imaginary part dropped. With full-rank covariances
(50,000 Inception features) this is TTUR's computation exactly.

IS (Salimans et al. 2016) follows OpenAI's `improved-gan/inception_score/model.py`: a softmax over
all the logits it is given (the 2015 graph's 1008 classes, unused ones included), split into
`num_splits` consecutive chunks, exp(mean KL(p(y|x) || p(y))) per chunk, then mean and std over
chunks (the form of the paper's 9.46 +- 0.11). OpenAI's code computes those logits as
pool_3 @ W *without* the softmax bias; the Inception extractor here returns exactly that (see
`inception.InceptionFeatures`).

Reference statistics are cached as `.npz` files holding `mu` [D] and `sigma` [D, D].
"""

import io
import warnings
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.linalg

from ddpm_jax import file_io


@runtime_checkable
class FeatureExtractor(Protocol):
  """Maps uint8 images to (pool features [N, D], class logits [N, K] or None)."""

  image_size: int

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 [N, H, W, C] -> (float pool features [N, D], float logits [N, K] or None)."""
    ...


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Features [N, D] -> (mean mu [D], covariance sigma [D, D]), both float64 (np.cov, N - 1)."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"Need features of shape [N >= 2, D]; got {features.shape}.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric PSD [D, D] -> its PSD square root [D, D] by eigendecomposition (float64).

  Negative eigenvalues from round-off are clipped to zero.
  """
  matrix = np.asarray(matrix, dtype=np.float64)
  matrix = 0.5 * (matrix + matrix.T)
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def _sqrtm_is_accurate(root: np.ndarray, matrix: np.ndarray, rtol: float = 1e-5) -> bool:
  """Whether `root` [D, D] is finite and root @ root matches `matrix` to `rtol` (Frobenius)."""
  if not np.isfinite(root).all():
    return False
  scale = max(np.linalg.norm(matrix), np.finfo(np.float64).tiny)
  return bool(np.linalg.norm(root @ root - matrix) <= rtol * scale)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  """Tr((sigma1 sigma2)^(1/2)) via scipy's sqrtm, with TTUR's eps * I fallback."""
  product = sigma1 @ sigma2
  with warnings.catch_warnings():  # A singular product is handled just below.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(product)
  if not _sqrtm_is_accurate(covmean, product):
    # Near-singular product (e.g. fewer samples than dimensions): regularise both covariances,
    # as TTUR and pytorch-fid do when the root is not finite.
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      max_imag = np.max(np.abs(covmean.imag))
      raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary component {max_imag:.3g}.")
    covmean = covmean.real
  return float(np.trace(covmean))


def trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr((sigma1 sigma2)^(1/2)) for PSD [D, D] inputs, as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)).

  The inner matrix is symmetric PSD, so its eigenvalues give the trace stably even when the
  covariances are singular; an alternative to the scipy route that `frechet_distance` uses.
  """
  root1 = sqrtm_psd(sigma1)
  eigvals = np.linalg.eigvalsh(root1 @ np.asarray(sigma2, np.float64) @ root1)
  return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def frechet_distance(
  mu1: np.ndarray,
  sigma1: np.ndarray,
  mu2: np.ndarray,
  sigma2: np.ndarray,
  eps: float = 1e-6,
  method: str = "sqrtm",
) -> float:
  """Fréchet distance between N(mu1 [D], sigma1 [D, D]) and N(mu2 [D], sigma2 [D, D]), float64.

  method "sqrtm" (default) is TTUR's scipy route, `eps` being the diagonal offset it adds when
  sqrtm(sigma1 @ sigma2) is inaccurate; "eigh" uses `trace_sqrt_product_eigh` instead.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
      f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
      f"{sigma2.shape}."
    )
  diff = mu1 - mu2
  if method == "sqrtm":
    tr_covmean = _trace_sqrt_product(sigma1, sigma2, eps)
  elif method == "eigh":
    tr_covmean = trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise ValueError(f"Unknown method {method!r}: use 'sqrtm' or 'eigh'.")
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two feature sets [N1, D] and [N2, D]."""
  return frechet_distance(*compute_statistics(features1), *compute_statistics(features2))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
  """Logits [N, K] -> (mean, std) of exp(E_x KL(p(y|x) || p(y))) over `num_splits` chunks.

  Chunks are consecutive with OpenAI's boundaries i * N // num_splits; the softmax runs over all
  K logits given (1008 for the Inception extractor, as in OpenAI's code).
  """
  logits = np.asarray(logits, dtype=np.float64)
  if logits.ndim != 2 or logits.shape[0] < num_splits:
    raise ValueError(f"Need logits [N >= num_splits={num_splits}, K]; got {logits.shape}.")
  log_p_yx = _log_softmax(logits)
  num = logits.shape[0]
  scores = []
  for i in range(num_splits):
    part = log_p_yx[i * num // num_splits : (i + 1) * num // num_splits]
    log_p_y = np.log(np.exp(part).mean(axis=0, keepdims=True))
    kl = (np.exp(part) * (part - log_p_y)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes `mu` [D] and `sigma` [D, D] (float64) to an .npz at `path` (local or gs://)."""
  buffer = io.BytesIO()
  np.savez(buffer, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
  file_io.write_atomically(path, buffer.getvalue())


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads (mu [D], sigma [D, D]) float64 from an .npz written by `save_statistics`."""
  with np.load(io.BytesIO(file_io.read_bytes(path))) as stats:
    if "mu" not in stats or "sigma" not in stats:
      raise ValueError(f"{path} is not a statistics file: it needs arrays 'mu' and 'sigma'.")
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
