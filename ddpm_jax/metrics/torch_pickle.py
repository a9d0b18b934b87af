"""Reads and writes PyTorch `torch.save` files of tensors as numpy arrays, without torch.

Two formats are read:
- zip (torch >= 1.6 default): `<archive>/data.pkl`, a protocol-2 pickle whose tensors are
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` (or
  `_rebuild_tensor_v3(..., dtype)` over an untyped storage) with storages as persistent ids
  `('storage', storage_type, key, location, numel)`, the raw bytes being `<archive>/data/<key>`;
- legacy (torch 0.4 .. 1.5, e.g. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`): pickles
  of a magic number, protocol version 1001 and system info, then the object with persistent ids
  `('storage', storage_type, key, location, numel, view_metadata)`, a pickled list of storage keys,
  then per key an int64 element count followed by the raw bytes.
The unpickler is restricted: only OrderedDict, the tensor-rebuild functions, storage types and
dtypes resolve, so a file holding arbitrary objects (a whole pickled module) is refused.

`save_state_dict` writes the zip format (or the legacy one) the way torch 2.x does, including the
64-byte alignment of records, so real `torch.load` reads it; numpy views of one base array share
one storage and keep their offset and strides.
"""

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

try:  # bfloat16 storages; ml_dtypes ships with jax.
  import ml_dtypes

  _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BFLOAT16 = None

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ALIGNMENT = 64  # torch >= 2.1 aligns every record's data to 64 bytes.

# torch storage class name <-> numpy dtype (typed storages, as named in the pickle).
_STORAGE_DTYPES = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "ComplexFloatStorage": np.dtype(np.complex64),
  "ComplexDoubleStorage": np.dtype(np.complex128),
}
if _BFLOAT16 is not None:
  _STORAGE_DTYPES["BFloat16Storage"] = _BFLOAT16
_DTYPE_TO_STORAGE = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}

# torch dtype names (`torch.float32` pickles as GLOBAL 'torch float32') -> numpy dtype.
_TORCH_DTYPES = {
  "float64": np.float64,
  "double": np.float64,
  "float32": np.float32,
  "float": np.float32,
  "float16": np.float16,
  "half": np.float16,
  "int64": np.int64,
  "long": np.int64,
  "int32": np.int32,
  "int": np.int32,
  "int16": np.int16,
  "short": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "uint16": np.uint16,
  "uint32": np.uint32,
  "uint64": np.uint64,
  "bool": np.bool_,
  "complex64": np.complex64,
  "cfloat": np.complex64,
  "complex128": np.complex128,
  "cdouble": np.complex128,
}
_TORCH_DTYPES = {name: np.dtype(dtype) for name, dtype in _TORCH_DTYPES.items()}
if _BFLOAT16 is not None:
  _TORCH_DTYPES["bfloat16"] = _BFLOAT16


class TorchFileError(ValueError):
  """A file that is not a readable PyTorch save of tensors."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for a `torch.<X>Storage` class (or `UntypedStorage`, whose dtype is uint8)."""

  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
  """Stand-in for a `torch.dtype` object."""

  name: str
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  """A flat storage: `numel` elements of `dtype`; `data` (bytes) is filled in when read."""

  key: str
  dtype: np.dtype
  numel: int
  data: bytes | None = None


@dataclasses.dataclass
class _TensorRef:
  """A tensor not yet materialised: a strided view of a storage (offset/stride in elements)."""

  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]
  dtype: np.dtype


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride), storage.dtype)


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None
):
  del requires_grad, hooks, metadata
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
  storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None
):
  del requires_grad, hooks, metadata
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride), dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
  del requires_grad, hooks
  return data


_ALLOWED_FUNCTIONS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals a state dict of tensors needs; storages via `storage_for`."""

  def __init__(self, file, storage_for=None):
    super().__init__(file)
    self._storage_for = storage_for

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_FUNCTIONS:
      return _ALLOWED_FUNCTIONS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    if module in ("torch", "torch.storage") and name == "UntypedStorage":
      return _StorageType(name, np.dtype(np.uint8))
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name, _TORCH_DTYPES[name])
    raise pickle.UnpicklingError(
      f"Refusing to load global {module}.{name}: only state dicts of tensors (no pickled "
      "modules or other objects) can be read without torch."
    )

  def persistent_load(self, pid: Any) -> _Storage:
    if not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f"Unexpected persistent id {pid!r}.")
    typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage" or self._storage_for is None:
      raise pickle.UnpicklingError(f"Unsupported persistent id of type {typename!r}.")
    return self._storage_for(*pid[1:])


def _materialise(ref: _TensorRef, little_endian: bool) -> np.ndarray:
  """A `_TensorRef` -> an owned numpy array (checks the view stays inside its storage)."""
  dtype = ref.dtype.newbyteorder("<" if little_endian else ">")
  if any(s < 0 for s in ref.stride) or len(ref.stride) != len(ref.size):
    raise TorchFileError(f"Bad tensor geometry: size {ref.size}, stride {ref.stride}.")
  if any(n == 0 for n in ref.size):
    return np.empty(ref.size, ref.dtype)
  flat = np.frombuffer(ref.storage.data, dtype=dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
  if ref.offset < 0 or last >= flat.size:
    raise TorchFileError(
      f"Tensor (offset {ref.offset}, size {ref.size}, stride {ref.stride}) overruns its storage "
      f"'{ref.storage.key}' of {flat.size} elements."
    )
  view = np.lib.stride_tricks.as_strided(
    flat[ref.offset :], shape=ref.size, strides=[s * dtype.itemsize for s in ref.stride]
  )
  return np.array(view, dtype=ref.dtype)  # A native-endian, contiguous copy.


def _resolve(obj: Any, little_endian: bool) -> Any:
  """Replaces every `_TensorRef` in nested dicts/lists/tuples by its numpy array."""
  if isinstance(obj, _TensorRef):
    return _materialise(obj, little_endian)
  if isinstance(obj, dict):
    resolved = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for key, value in obj.items():
      resolved[key] = _resolve(value, little_endian)
    return resolved
  if isinstance(obj, list | tuple):
    return type(obj)(_resolve(value, little_endian) for value in obj)
  return obj


def _load_zip(file: io.BytesIO) -> Any:
  with zipfile.ZipFile(file) as archive:
    names = archive.namelist()
    pickles = [name for name in names if name.endswith("data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
      raise TorchFileError(f"Expected one '<archive>/data.pkl' in the zip; found {pickles}.")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}

    def storage_for(storage_type, key, location, numel):
      del location
      if key not in storages:
        data = archive.read(f"{prefix}data/{key}")
        itemsize = storage_type.dtype.itemsize  # UntypedStorage: uint8, numel = bytes.
        if len(data) != numel * itemsize:
          raise TorchFileError(f"Storage {key}: {len(data)} bytes for {numel} elements.")
        storages[key] = _Storage(key, storage_type.dtype, numel, data)
      return storages[key]

    result = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storage_for).load()
  return _resolve(result, byteorder == "little")


def _load_legacy(file: io.BytesIO) -> Any:
  try:
    magic = _RestrictedUnpickler(file).load()
  except Exception as e:  # Not a pickle at all.
    raise TorchFileError(f"Not a PyTorch zip or legacy file ({type(e).__name__}: {e}).") from e
  if magic != _LEGACY_MAGIC:
    raise TorchFileError(
      "Not a PyTorch save (wrong magic number; the pre-0.4 tar format and "
      "plain pickles are not supported)."
    )
  protocol = _RestrictedUnpickler(file).load()
  if protocol != _LEGACY_PROTOCOL:
    raise TorchFileError(f"Unsupported legacy protocol version {protocol}.")
  sys_info = _RestrictedUnpickler(file).load()
  little_endian = bool(sys_info.get("little_endian", True))
  storages: dict[str, _Storage] = {}
  views = []

  def storage_for(storage_type, key, location, numel, view_metadata=None):
    del location
    if key not in storages:
      storages[key] = _Storage(key, storage_type.dtype, int(numel))
    if view_metadata is None:
      return storages[key]
    view_key, view_offset, view_size = view_metadata  # A storage slice (torch < 1.0 files).
    view = _Storage(view_key, storage_type.dtype, int(view_size))
    views.append((view, storages[key], int(view_offset)))
    return view

  result = _RestrictedUnpickler(file, storage_for).load()
  keys = _RestrictedUnpickler(file).load()
  order = "<" if little_endian else ">"
  for key in keys:
    storage = storages[key]
    (numel,) = struct.unpack(order + "q", file.read(8))
    storage.data = file.read(numel * storage.dtype.itemsize)
    if numel != storage.numel or len(storage.data) != numel * storage.dtype.itemsize:
      raise TorchFileError(f"Storage {key} is truncated or has a wrong size.")
  for view, base, offset in views:
    itemsize = view.dtype.itemsize
    view.data = base.data[offset * itemsize : (offset + view.numel) * itemsize]
  return _resolve(result, little_endian)


def load(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` file; tensors become numpy arrays (other structure is kept)."""
  with open(path, "rb") as f:
    file = io.BytesIO(f.read())
  if zipfile.is_zipfile(file):
    file.seek(0)
    return _load_zip(file)
  file.seek(0)
  return _load_legacy(file)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a saved state dict -> {name: numpy array} in file order.

  A checkpoint that wraps it as {'state_dict': ...} is unwrapped.
  """
  obj = load(path)
  if isinstance(obj, Mapping) and set(obj) == {"state_dict"}:
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise TorchFileError(f"{path} does not hold a flat state dict of tensors.")
  return dict(obj)


# --- Writing -----------------------------------------------------------------------------------


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
