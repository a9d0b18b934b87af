"""The named datasets and where each comes from (no TensorFlow: config validation reads it)."""

from __future__ import annotations

import dataclasses

DIGITS_TFDS_NAME = "ddpm_digits"  # The embedded digits' TFDS builder (`digits_tfds`).


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where a named dataset comes from: a TFDS builder, or a path in `data.data_dir`."""

  tfds_name: str | None  # None: an image folder.
  train_split: str = "train"
  stylegan_tfrecords: bool = False  # May be read from TFRecords when data.source == 'tfrecords'.


DATASETS: dict[str, DatasetSpec] = {
  "cifar10": DatasetSpec("cifar10"),
  "celeb_a_hq": DatasetSpec("celeb_a_hq/256"),
  "lsun_church": DatasetSpec("lsun/church_outdoor", stylegan_tfrecords=True),
  "lsun_bedroom": DatasetSpec("lsun/bedroom", stylegan_tfrecords=True),
  "lsun_cat": DatasetSpec("lsun/cat", stylegan_tfrecords=True),
  "digits": DatasetSpec(DIGITS_TFDS_NAME),
  "folder": DatasetSpec(None),
}
DATA_SOURCES = ("tfds", "tfrecords")
