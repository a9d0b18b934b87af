"""Paths and atomic file writes on any path tf.io.gfile handles (local or gs://)."""

from __future__ import annotations

import os


def is_remote(path: str) -> bool:
  """Whether `path` names a file system by scheme (gs://, s3://, ...), not a local path."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike[str]) -> str:
  """A user-given path made absolute once, at the edge: '~' expanded, relative local paths
  resolved against the current directory; '' and remote paths (gs://...) stay as they are."""
  path = os.fspath(path)
  if not path or is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


class WorkdirError(ValueError):
  """A directory the user named cannot be used (a file, not writable, not creatable)."""


def make_writable_dir(path: str, flag: str) -> None:
  """Creates directory `path` if needed and checks that files can be written in it (local
  paths: by writing and removing a probe file). Raises WorkdirError, naming `flag`."""
  import tensorflow as tf

  if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
    raise WorkdirError(f"{flag}={path} is a file, not a directory. Pass a directory to write to.")
  try:
    tf.io.gfile.makedirs(path)
    if not is_remote(path):
      probe = os.path.join(path, f".write_probe_{os.getpid()}")
      with open(probe, "wb"):
        pass
      os.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
    raise WorkdirError(f"{flag}={path} cannot be written: {reason}. Pass a directory you can "
                       "write to.") from None


def write_atomically(path: str, data: bytes) -> None:
  """Writes `data` under a temporary name, then renames it to `path`: a reader (or a rerun after
  a kill) sees the old file or the new one, never half of one. Creates the parent directory."""
  import tensorflow as tf

  path = os.fspath(path)
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  tmp = f"{path}.tmp{os.getpid()}"  # Per process, so concurrent writers never share a temp file.
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(data)
  tf.io.gfile.rename(tmp, path, overwrite=True)
