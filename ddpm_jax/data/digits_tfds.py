"""`ddpm_digits`: scikit-learn's 1,797 real 8x8 handwritten digits as a TFDS dataset.

The pixels ship inside the scikit-learn wheel (`sklearn.datasets.load_digits`), so
`download_and_prepare()` works offline; it lets the full training job run with no download
through the same TFDS path as CIFAR-10. The name is `ddpm_digits` because TFDS has no `digits`
builder and a package-specific prefix keeps it from clashing with a future one.

Pixels 0..16 are scaled to uint8 by round(v * 255 / 16); images stay at the native 8x8 and the
input pipeline resizes them to `config.data.image_size`. Splits: `train` is the first 1,500
digits and `test` the remaining 297, both in scikit-learn's order (shuffling is disabled so the
stored order is that order).
"""

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ddpm_jax.data.digits import IMAGE_SIZE, NUM_CLASSES, NUM_TRAIN, load_digits_uint8
from ddpm_jax.data.specs import DIGITS_TFDS_NAME


class DdpmDigits(tfds.core.GeneratorBasedBuilder):
  """The 8x8 digits of scikit-learn (UCI optdigits test set), prepared offline."""

  name = DIGITS_TFDS_NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. TFDS 4.9's own lookup needs `importlib_resources`, which it does not install."""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="The 1,797 8x8 handwritten digits bundled with scikit-learn, scaled to 0..255.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://archive.ics.uci.edu/dataset/80",
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: the data is in the scikit-learn wheel.
    return {
      "train": self._generate_examples(0, NUM_TRAIN),
      "test": self._generate_examples(NUM_TRAIN, None),
    }

  def _generate_examples(self, start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
    images, labels = load_digits_uint8()
    for index in range(start, len(images) if stop is None else stop):
      yield index, {"image": images[index], "label": labels[index]}
