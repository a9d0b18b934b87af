"""Writes PyTorch `torch.save` files of numpy arrays without torch, for the tests of the reader
(`ddpm_jax.weights.torch_pickle`) and of the importers.

`save_state_dict` writes the zip format (or the legacy one) the way torch 2.x does, including the
64-byte alignment of records, so real `torch.load` reads it; numpy views of one base array share
one storage and keep their offset and strides.
"""

import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping

import numpy as np

from ddpm_jax.weights.torch_pickle import (
  _DTYPE_TO_STORAGE,
  _LEGACY_MAGIC,
  _LEGACY_PROTOCOL,
  _StorageType,
)

_ALIGNMENT = 64  # torch >= 2.1 aligns every record's data to 64 bytes.


class _PickleWriter:
  """Emits the protocol-2 opcodes torch writes for an OrderedDict of tensors."""

  def __init__(self):
    self.out = io.BytesIO()
    self.out.write(pickle.PROTO + bytes([2]))

  def global_(self, module: str, name: str) -> None:
    self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))

  def string(self, value: str) -> None:
    data = value.encode("utf-8")
    self.out.write(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

  def int_(self, value: int) -> None:
    if 0 <= value < 256:
      self.out.write(pickle.BININT1 + bytes([value]))
    elif -(2**31) <= value < 2**31:
      self.out.write(pickle.BININT + struct.pack("<i", value))
    else:
      data = pickle.encode_long(value)
      self.out.write(pickle.LONG1 + bytes([len(data)]) + data)

  def int_tuple(self, values: tuple[int, ...]) -> None:
    self.out.write(pickle.MARK)
    for value in values:
      self.int_(value)
    self.out.write(pickle.TUPLE)

  def empty_ordered_dict(self) -> None:
    self.global_("collections", "OrderedDict")
    self.out.write(pickle.EMPTY_TUPLE + pickle.REDUCE)

  def tensor(self, storage_pid: tuple, offset: int, size, stride) -> None:
    """_rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())."""
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.out.write(pickle.MARK + pickle.MARK)
    for item in storage_pid:
      if isinstance(item, _StorageType):
        self.global_("torch", item.name)
      elif item is None:
        self.out.write(pickle.NONE)
      elif isinstance(item, str):
        self.string(item)
      else:
        self.int_(item)
    self.out.write(pickle.TUPLE + pickle.BINPERSID)
    self.int_(offset)
    self.int_tuple(tuple(size))
    self.int_tuple(tuple(stride))
    self.out.write(pickle.NEWFALSE)
    self.empty_ordered_dict()
    self.out.write(pickle.TUPLE + pickle.REDUCE)

  def finish(self) -> bytes:
    self.out.write(pickle.STOP)
    return self.out.getvalue()


def _root_array(array: np.ndarray) -> np.ndarray:
  root = array
  while isinstance(root.base, np.ndarray):
    root = root.base
  return root


def _as_view_of_root(array: np.ndarray):
  """(root, offset, stride) in elements if `array` is a view torch can express, else None."""
  root = _root_array(array)
  itemsize = array.dtype.itemsize
  if root is array or root.dtype != array.dtype or not root.flags.c_contiguous:
    return None
  byte_offset = array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
  if byte_offset < 0 or byte_offset % itemsize or any(s < 0 or s % itemsize for s in array.strides):
    return None
  stride = tuple(s // itemsize for s in array.strides)
  last = byte_offset // itemsize + sum(
    (n - 1) * s for n, s in zip(array.shape, stride, strict=True)
  )
  if array.size and last >= root.size:
    return None
  return root, byte_offset // itemsize, stride


def _plan_storages(state_dict: Mapping[str, np.ndarray]):
  """-> ([(name, storage_index, offset, size, stride)], [root arrays]) sharing views' storages."""
  tensors, roots, root_index = [], [], {}
  for name, value in state_dict.items():
    array = np.asarray(value)
    if array.dtype.newbyteorder("=") not in _DTYPE_TO_STORAGE:
      raise TypeError(f"{name}: dtype {array.dtype} has no torch storage type.")
    view = _as_view_of_root(array)
    if view is None:
      root, offset = np.ascontiguousarray(array), 0
      stride = tuple(int(np.prod(array.shape[i + 1 :])) for i in range(array.ndim))
    else:
      root, offset, stride = view
    if id(root) not in root_index:
      root_index[id(root)] = len(roots)
      roots.append(root)
    tensors.append((str(name), root_index[id(root)], offset, array.shape, stride))
  return tensors, roots


def _pickle_state_dict(tensors, roots, keys: list[str], legacy: bool) -> bytes:
  writer = _PickleWriter()
  writer.empty_ordered_dict()
  writer.out.write(pickle.MARK)
  for name, index, offset, size, stride in tensors:
    root = roots[index]
    storage_type = _StorageType(_DTYPE_TO_STORAGE[root.dtype.newbyteorder("=")], root.dtype)
    pid = ("storage", storage_type, keys[index], "cpu", int(root.size))
    writer.string(name)
    writer.tensor(pid + (None,) if legacy else pid, offset, size, stride)
  writer.out.write(pickle.SETITEMS)
  return writer.finish()


def _little_endian_bytes(root: np.ndarray) -> bytes:
  return np.ascontiguousarray(root, dtype=root.dtype.newbyteorder("<")).tobytes()


def _write_aligned(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
  """A stored record whose data starts on a 64-byte boundary ('FB' padding field, as torch)."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  start = archive.fp.tell() + 30 + len(name.encode("utf-8")) + 4
  padding = -start % _ALIGNMENT
  info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
  archive.writestr(info, data)


def save_state_dict(
  path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], legacy_format: bool = False
) -> None:
  """Writes {name: array} as a torch.save file (zip format, or legacy with `legacy_format`).

  Arrays that are views of one base share one storage with their offset and strides, as torch
  saves views; anything else is written contiguous.
  """
  tensors, roots = _plan_storages(state_dict)
  path = os.fspath(path)
  if legacy_format:
    keys = [str(i) for i in range(len(roots))]
    with open(path, "wb") as f:
      for header in (
        _LEGACY_MAGIC,
        _LEGACY_PROTOCOL,
        {
          "protocol_version": _LEGACY_PROTOCOL,
          "little_endian": True,
          "type_sizes": {"short": 2, "int": 4, "long": 4},
        },
      ):
        f.write(pickle.dumps(header, protocol=2))
      f.write(_pickle_state_dict(tensors, roots, keys, legacy=True))
      f.write(pickle.dumps(keys, protocol=2))
      for root in roots:
        f.write(struct.pack("<q", root.size) + _little_endian_bytes(root))
    return
  keys = [str(i) for i in range(len(roots))]
  archive_name = os.path.splitext(os.path.basename(path))[0] or "archive"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    _write_aligned(
      archive, f"{archive_name}/data.pkl", _pickle_state_dict(tensors, roots, keys, legacy=False)
    )
    _write_aligned(archive, f"{archive_name}/.format_version", b"1")
    _write_aligned(archive, f"{archive_name}/.storage_alignment", str(_ALIGNMENT).encode())
    _write_aligned(archive, f"{archive_name}/byteorder", b"little")
    for key, root in zip(keys, roots, strict=True):
      _write_aligned(archive, f"{archive_name}/data/{key}", _little_endian_bytes(root))
    _write_aligned(archive, f"{archive_name}/version", b"3\n")
