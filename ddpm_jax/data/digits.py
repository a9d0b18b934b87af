"""scikit-learn's 1,797 real 8x8 handwritten digits (the UCI optdigits test set), which ship
inside its wheel: the embedded dataset, with no download and no TensorFlow.

Pixels 0..16 are scaled to uint8 by round(v * 255 / 16). The TFDS builder (`digits_tfds`) and the
digits' feature network (`evaluation.digits_features`) read them here.
"""

import numpy as np

NUM_TRAIN = 1500  # The train split: the first 1,500 digits in scikit-learn's order; test: the rest.
IMAGE_SIZE = 8
NUM_CLASSES = 10


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [1797, 8, 8, 1] in 0..255, labels int64 [1797]) in scikit-learn's order."""
  from sklearn.datasets import load_digits  # Imported lazily: only the data needs it.

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)
