"""FID/IS of sample sets against the real data, with cached reference statistics."""

import os

import numpy as np
import pytest
from conftest import tiny_digits_config

from ddpm_jax import image_grid
from ddpm_jax.data import pipeline
from ddpm_jax.evaluation import sample_quality


def real_digits(config, split):
  batches = pipeline.create_eval_dataset(
    config, process_index=0, process_count=1, batch_size_per_process=300, split=split
  )
  return np.concatenate([image_grid.to_uint8(x[m]) for x, m in batches])


def test_real_digits_score_far_better_than_noise_and_stats_are_cached(tmp_path, monkeypatch):
  config = tiny_digits_config(
    **{"data.data_dir": str(tmp_path / "tfds"), "eval.fid_stats_dir": str(tmp_path / "stats")}
  )
  held_out = real_digits(config, "test")
  real = sample_quality.evaluate_samples(config, held_out)
  noise = np.random.default_rng(0).integers(0, 256, held_out.shape, dtype=np.uint8)
  fake = sample_quality.evaluate_samples(config, noise)
  assert real["fid"] * 10 < fake["fid"]
  assert real["inception_score"] > 5 > fake["inception_score"]
  assert real["num_samples"] == 297
  stats = os.listdir(tmp_path / "stats")
  assert stats == ["digits_train_8px_digits_net_v1.npz"]
  # The second evaluation reads the cache instead of the data set.
  monkeypatch.setattr(sample_quality, "real_features", lambda *a, **k: pytest.fail("recomputed"))
  again = sample_quality.evaluate_samples(config, held_out)
  assert again["fid"] == pytest.approx(real["fid"], rel=1e-9)


def test_natural_images_need_the_inception_weights(tmp_path):
  from ddpm_jax.evaluation.inception import MissingWeightsError

  config = tiny_digits_config(
    **{"data.dataset": "cifar10", "eval.inception_weights": str(tmp_path / "missing.npz")}
  )
  with pytest.raises(MissingWeightsError, match="convert_inception"):
    sample_quality.feature_extractor(config)
