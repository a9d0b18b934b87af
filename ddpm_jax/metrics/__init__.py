"""Sample-quality metrics: FID and Inception Score, with their feature extractors.

- `fid`: Fréchet distance, feature statistics, Inception Score, the `FeatureExtractor` protocol.
- `inception`: the FID Inception-v3 (2015 TF graph) in Flax and `InceptionFeatures`.
- `convert_inception`: pytorch-fid's .pth weights -> the .npz `InceptionFeatures` loads.
- `torch_pickle`: reads torch.save files (possibly hostile) as numpy without torch, checking
  names, shapes and dtypes before any tensor is read; writes them for the tests.
- `digits_features`: a small classifier of the 8x8 digits, their FID/IS feature net.
"""

from ddpm_jax.metrics.fid import (
  FeatureExtractor,
  compute_statistics,
  fid_from_features,
  frechet_distance,
  inception_score,
  load_statistics,
  save_statistics,
  sqrtm_psd,
)

__all__ = [
  "FeatureExtractor",
  "compute_statistics",
  "fid_from_features",
  "frechet_distance",
  "inception_score",
  "load_statistics",
  "save_statistics",
  "sqrtm_psd",
]
