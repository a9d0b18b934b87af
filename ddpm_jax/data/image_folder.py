"""A folder of image files (searched recursively for *.png, *.jpg, *.jpeg) as a dataset.

Labels: a folder whose images all sit in top-level sub-folders (`DIR/<class>/...`, at any depth
below `<class>`) is labelled, each image with the index of its `<class>` in the sorted names of
the sub-folders that hold images. Images directly in `DIR` (alone or mixed with sub-folders)
make the folder unlabelled.
"""

import dataclasses
import os

import tensorflow as tf

EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class ImageFolder:
  """The images of a folder and, if it has them, their class labels."""

  files: list[str]  # Sorted paths.
  labels: list[int] | None  # Class index of each file; None when the folder has no labels.
  class_names: list[str]  # Sorted class sub-folder names; [] when the folder has no labels.
  num_top_level_files: int  # Images directly in the folder (which leave it unlabelled).


def _images_in(root: str, names: list[str]) -> list[str]:
  return [os.path.join(root, n) for n in names if n.lower().endswith(EXTENSIONS)]


def scan(folder: str) -> ImageFolder:
  """Lists the images under `folder` (a directory listing, no image is read) and their classes."""
  if not folder or not tf.io.gfile.isdir(folder):
    return ImageFolder([], None, [], 0)
  walk = tf.io.gfile.walk(folder)
  top, subdirs, names = next(walk)
  top_level = _images_in(top, names)
  by_class = {}
  for subdir in subdirs:
    for root, _, names in tf.io.gfile.walk(tf.io.gfile.join(top, subdir)):
      by_class.setdefault(subdir, []).extend(_images_in(root, names))
  by_class = {name: paths for name, paths in by_class.items() if paths}
  files = sorted(top_level + [path for paths in by_class.values() for path in paths])
  if top_level or not by_class:
    return ImageFolder(files, None, [], len(top_level))
  class_names = sorted(by_class)
  index = {path: i for i, name in enumerate(class_names) for path in by_class[name]}
  return ImageFolder(files, [index[path] for path in files], class_names, 0)


def list_files(folder: str) -> list[str]:
  """Returns the image files under `folder` (recursively, any case of extension), sorted."""
  return scan(folder).files


def read_image(path: tf.Tensor, num_channels: int) -> tf.Tensor:
  """Reads and decodes one image file into uint8 [H, W, num_channels]."""
  image = tf.io.decode_image(
    tf.io.read_file(path), channels=num_channels, dtype=tf.uint8, expand_animations=False
  )
  image.set_shape([None, None, num_channels])
  return image
