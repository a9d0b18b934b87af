"""The digits' feature network for their FID and IS."""

import jax
import numpy as np
import pytest

from ddpm_jax.evaluation import digits_features, fid

# -- The digits feature net. -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_extractor(tmp_path_factory):
  """Trains the net once (cache in a temporary folder) for this module."""
  return digits_features.DigitsFeatures(str(tmp_path_factory.mktemp("digits") / "net.npz"))


@pytest.fixture(scope="module")
def digits():
  return digits_features.load_digits_uint8()


def test_digits_images_match_the_dataset_scaling(digits):
  from sklearn.datasets import load_digits

  images, labels = digits
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
  raw = load_digits().images
  np.testing.assert_array_equal(images[..., 0], np.round(raw * 255 / 16).astype(np.uint8))
  assert images.max() == 255 and labels.shape == (1797,)


def test_digits_classifier_accuracy_and_cache(digits_extractor, digits):
  images, labels = digits
  features, logits = digits_extractor(images[1500:])
  assert features.shape == (297, 64) and logits.shape == (297, 10)
  accuracy = np.mean(np.argmax(logits, -1) == labels[1500:])
  assert accuracy > 0.95
  assert digits_extractor.held_out_accuracy == pytest.approx(accuracy)
  assert isinstance(digits_extractor, fid.FeatureExtractor) and digits_extractor.image_size == 8
  # A second instance loads the cache (no training) and computes the same features.
  reloaded = digits_features.DigitsFeatures(digits_extractor.cache_path)
  np.testing.assert_array_equal(reloaded(images[1500:])[0], features)
  # Larger or RGB inputs are brought to 8x8 gray.
  big = np.repeat(np.repeat(np.repeat(images[:5], 2, 1), 2, 2), 3, -1)
  assert reloaded(big)[0].shape == (5, 64)


def test_digits_training_is_deterministic(digits_extractor):
  params, accuracy = digits_features.train_digits_classifier(seed=0)
  assert accuracy == digits_extractor.held_out_accuracy
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(digits_extractor.params), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_digits_fid_separates_real_from_noise(digits_extractor, digits):
  images, _ = digits
  train_features, train_logits = digits_extractor(images[:1500])
  held_features, _ = digits_extractor(images[1500:])
  noise = np.random.default_rng(13).integers(0, 256, (297, 8, 8, 1), dtype=np.uint8)
  noise_features, noise_logits = digits_extractor(noise)
  fid_real = fid.fid_from_features(train_features, held_features)
  fid_noise = fid.fid_from_features(train_features, noise_features)
  assert fid_noise > 10 * fid_real
  is_real, _ = fid.inception_score(train_logits)
  is_noise, _ = fid.inception_score(noise_logits)
  assert is_real > 8 and is_real > 2 * is_noise
