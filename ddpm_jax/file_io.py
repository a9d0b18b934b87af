"""Paths and files on any file system etils.epath reaches (local, gs://): user paths made
absolute, reads, atomic writes. TensorFlow is not imported for local paths."""

from __future__ import annotations

import os

from etils import epath


class WorkdirError(ValueError):
  """A directory the user named cannot be used (a file, not writable, not creatable)."""


def is_remote(path: str | os.PathLike[str]) -> bool:
  """Whether `path` names a file system by scheme (gs://, s3://, ...), not a local path."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike[str]) -> str:
  """A user-given path made absolute once, at the edge: '~' expanded, relative local paths
  resolved against the current directory; '' and remote paths (gs://...) stay as they are."""
  path = os.fspath(path)
  if not path or is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def glob(directory: str, pattern: str) -> list[str]:
  """The paths in `directory` matching `pattern` (e.g. 'shard_*.npz'), sorted."""
  return sorted(os.fspath(p) for p in epath.Path(directory).glob(pattern))


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove(path: str) -> None:
  epath.Path(path).unlink()


def make_writable_dir(path: str, flag: str) -> None:
  """Creates directory `path` if needed and checks that files can be written in it (by writing
  and removing a probe file). Raises WorkdirError, naming `flag`."""
  directory = epath.Path(path)
  if directory.exists() and not directory.is_dir():
    raise WorkdirError(f"{flag}={path} is a file, not a directory. Pass a directory to write to.")
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_probe_{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except Exception as e:  # noqa: BLE001 - OSError locally; each remote backend has its own.
    reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
    raise WorkdirError(
      f"{flag}={path} cannot be written: {reason}. Pass a directory you can write to."
    ) from None


def write_atomically(path: str, data: bytes) -> None:
  """Writes `data` under a temporary name, then renames it to `path`: a reader (or a rerun after
  a kill) sees the old file or the new one, never half of one. Creates the parent directory."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f"{target.name}.tmp{os.getpid()}"  # Per process: no shared temp file.
  tmp.write_bytes(data)
  tmp.replace(target)
