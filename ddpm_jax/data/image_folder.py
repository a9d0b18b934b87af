"""A folder of image files (searched recursively for *.png, *.jpg, *.jpeg) as a dataset."""

import os

import tensorflow as tf

EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_files(folder: str) -> list[str]:
  """Returns the image files under `folder` (recursively, any case of extension), sorted."""
  if not folder or not tf.io.gfile.isdir(folder):
    return []
  files = []
  for root, _, names in tf.io.gfile.walk(folder):
    files.extend(os.path.join(root, n) for n in names if n.lower().endswith(EXTENSIONS))
  return sorted(files)


def read_image(path: tf.Tensor, num_channels: int) -> tf.Tensor:
  """Reads and decodes one image file into uint8 [H, W, num_channels]."""
  image = tf.io.decode_image(
    tf.io.read_file(path), channels=num_channels, dtype=tf.uint8, expand_animations=False
  )
  image.set_shape([None, None, num_channels])
  return image
