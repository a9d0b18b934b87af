"""Atomic file writes on any path tf.io.gfile handles (local or gs://)."""

from __future__ import annotations

import os

import tensorflow as tf


def write_atomically(path: str, data: bytes) -> None:
  """Writes `data` under a temporary name, then renames it to `path`: a reader (or a rerun after
  a kill) sees the old file or the new one, never half of one. Creates the parent directory."""
  path = os.fspath(path)
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  tmp = f"{path}.tmp{os.getpid()}"  # Per process, so concurrent writers never share a temp file.
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(data)
  tf.io.gfile.rename(tmp, path, overwrite=True)
