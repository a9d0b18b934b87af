"""FID and Inception Score of a sample set against the real data, with cached reference stats.

The feature network follows the dataset: the FID Inception-v3 (weights from
`eval.inception_weights`) for natural images, and the small digits classifier of
`metrics.digits_features` for the embedded 8x8 digits, where Inception is meaningless.
"""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from ddpm_jax import file_io, image_grid
from ddpm_jax.evaluation import fid
from ddpm_jax.evaluation.fid import FeatureExtractor


def feature_extractor(config: ml_collections.ConfigDict) -> tuple[str, FeatureExtractor]:
  """(name, extractor) for the config's dataset; raises MissingWeightsError without weights."""
  if config.data.dataset == "digits":
    from ddpm_jax.evaluation.digits_features import DigitsFeatures

    return "digits_net_v1", DigitsFeatures()
  from ddpm_jax.evaluation.inception import InceptionFeatures

  return "inception_2015", InceptionFeatures(config.eval.inception_weights)


def _stats_path(config: ml_collections.ConfigDict, extractor_name: str) -> str:
  root = config.eval.fid_stats_dir or os.path.join(
    os.path.expanduser("~"), ".cache", "ddpm_jax", "fid_stats"
  )
  name = (
    f"{config.data.dataset}_{config.eval.fid_split}_{config.data.image_size}px_{extractor_name}.npz"
  )
  return os.path.join(root, name)


def real_features(
  config: ml_collections.ConfigDict, extractor: FeatureExtractor, num_examples: int = -1
) -> np.ndarray:
  """Pool features `[N, D]` of the real images of `eval.fid_split` (one process reads all)."""
  from ddpm_jax.data import pipeline  # TensorFlow: the real images.

  batches = pipeline.create_eval_dataset(
    config,
    process_index=0,
    process_count=1,
    batch_size_per_process=500,
    split=config.eval.fid_split,
    num_examples=num_examples,
  )
  features = [extractor(image_grid.to_uint8(images[mask]))[0] for images, mask in batches]
  return np.concatenate(features)


def reference_statistics(
  config: ml_collections.ConfigDict, extractor_name: str, extractor: FeatureExtractor
) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the real data's features, computed once and cached under
  `eval.fid_stats_dir` (default ~/.cache/ddpm_jax/fid_stats)."""
  path = _stats_path(config, extractor_name)
  if file_io.exists(path):
    return fid.load_statistics(path)
  logging.info(
    "Computing the reference FID statistics of %s/%s into %s",
    config.data.dataset,
    config.eval.fid_split,
    path,
  )
  mu, sigma = fid.compute_statistics(real_features(config, extractor))
  fid.save_statistics(path, mu, sigma)
  return mu, sigma


def evaluate_samples(
  config: ml_collections.ConfigDict, samples: np.ndarray, labels: np.ndarray | None = None
) -> dict[str, float]:
  """FID against the real data, and IS with 10 splits, of uint8 samples `[N, H, W, C]`; with
  the labels `[N]` they were asked for, also `class_accuracy`: how often the feature network's
  classifier sees the requested class (when it classifies the dataset's classes, as the digits'
  does; the Inception's 1008 ImageNet classes are not CIFAR-10's)."""
  name, extractor = feature_extractor(config)
  mu_real, sigma_real = reference_statistics(config, name, extractor)
  pool, logits = extractor(samples)
  mu, sigma = fid.compute_statistics(pool)
  result = {
    "fid": fid.frechet_distance(mu, sigma, mu_real, sigma_real),
    "num_samples": float(len(samples)),
  }
  if logits is not None:
    result["inception_score"], result["inception_score_std"] = fid.inception_score(logits)
    if labels is not None and logits.shape[1] == config.model.num_classes:
      result["class_accuracy"] = float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))
  return result
