"""Reads PyTorch `torch.save` files of tensors as numpy arrays, without torch.

Two formats are read:
- zip (torch >= 1.6 default): `<archive>/data.pkl`, a protocol-2 pickle whose tensors are
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` (or
  `_rebuild_tensor_v3(..., dtype)` over an untyped storage) with storages as persistent ids
  `('storage', storage_type, key, location, numel)`, the raw bytes being `<archive>/data/<key>`;
- legacy (torch 0.4 .. 1.5, e.g. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`): pickles
  of a magic number, protocol version 1001 and system info, then the object with persistent ids
  `('storage', storage_type, key, location, numel, view_metadata)`, a pickled list of storage keys,
  then per key an int64 element count followed by the raw bytes.

Weight files come from the internet, so reading trusts nothing in them:
- the pickle (at most 1 MiB) runs in the pure-Python unpickler, whose memo is a dict (the C one
  allocates an array as long as the largest memo index a pickle names: 9 bytes can claim 2 GB);
  only OrderedDict, the tensor-rebuild functions, storage types and dtypes resolve, and opcodes
  that build other objects are refused, so a pickled module or `os.system` never runs;
- tensors stay references (storage, offset, size, stride, dtype) until checked: sizes, strides
  and offsets are integers in [0, 2**62], every view lies inside its storage, each storage's zip
  member or legacy record holds exactly the bytes its persistent id declares; shared containers
  are walked once, at most 32 deep and 2**20 entries in all;
- `load_state_dict(path, expected)` checks names, shapes and dtypes before any array exists and
  materialises only the expected tensors; each storage is read only as far as they need (a
  DEFLATE bomb or a lying zip header inflates no further), and without `expected` the arrays
  may take at most `max_bytes` (default 4x the file's size + 64 MiB: a stride-0 view of 411
  bytes does not become 1 GiB).
Anything malformed ends in one `TorchFileError` whose one-line message names the file and the
problem."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import math
import os
import pickle
import reprlib
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

try:  # bfloat16 storages; ml_dtypes ships with jax.
  import ml_dtypes

  _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BFLOAT16 = None

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_SIGNATURE = b"PK\x03\x04"  # torch tells its two formats apart by this, as we do.

_MAX_PICKLE_BYTES = 1 << 20  # A state dict pickles in ~100 bytes a tensor.
_MAX_DEPTH = 32  # Nesting of containers; a state dict has 1 to 3 levels.
_MAX_ELEMENTS = 1 << 20  # Container entries walked in all, each shared container once.
_MAX_DIMS = 32
_MAX_COUNT = 1 << 62  # Sizes, strides, offsets and element counts (torch's are int64).
_DEFAULT_BUDGET = 64 << 20  # Without `expected`: arrays up to 4x the file's size + this.

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
  """A file that is not a readable PyTorch save of tensors (one line naming the file)."""


class TensorSpec(NamedTuple):
  """A tensor's shape and dtype as its file declares them."""

  shape: tuple[int, ...]
  dtype: np.dtype


# -- Reading: what the pickle builds. -----------------------------------------------------------


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


@dataclasses.dataclass(frozen=True, eq=False)
class _Storage:
  """A storage of a checked persistent id: `nbytes` bytes from byte `start` of record `key`
  (`start` > 0 only for the storage slices of legacy files); `dtype`: its element type."""

  key: str
  dtype: np.dtype
  nbytes: int
  start: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class _TensorRef:
  """A tensor as the pickle rebuilds it, unchecked: `dtype` None means the storage's."""

  storage: Any
  offset: Any
  size: Any
  stride: Any
  dtype: Any = None


class _View(NamedTuple):
  """A checked tensor: `shape` elements of `dtype` at `offset` + i . `stride` (in elements)."""

  storage: _Storage
  dtype: np.dtype
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    """Bytes of the materialised array."""
    return math.prod(self.shape) * self.dtype.itemsize

  @property
  def end(self) -> int:
    """Bytes of its storage it reads (from the storage's start), 0 when empty."""
    if not math.prod(self.shape):
      return 0
    last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
    return (last + 1) * self.dtype.itemsize


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None
):
  del requires_grad, hooks, metadata
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
  storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None
):
  del requires_grad, hooks, metadata
  return _TensorRef(storage, storage_offset, size, stride, dtype)


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


def _refusing(opcode: str) -> Callable[[Any], None]:
  def refuse(unpickler) -> None:
    del unpickler
    raise pickle.UnpicklingError(f"opcode {opcode} builds objects a state dict never holds")

  return refuse


def _load_build(unpickler) -> None:
  """BUILD only as torch's state dicts use it: an OrderedDict's `_metadata`, which is dropped."""
  unpickler.stack.pop()
  if type(unpickler.stack[-1]) is not collections.OrderedDict:
    raise pickle.UnpicklingError("opcode BUILD on an object other than an OrderedDict")


class _RestrictedUnpickler(pickle._Unpickler):  # The pure-Python one: its memo is a dict.
  """Resolves only the globals a state dict of tensors needs; storages via `storage_for`."""

  dispatch = {
    **pickle._Unpickler.dispatch,
    **{
      getattr(pickle, op)[0]: _refusing(op)
      for op in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4")
    },
    pickle.BUILD[0]: _load_build,
  }

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
      f"Refusing to load global {_one_line(module, 80)}.{_one_line(name, 80)}: only state dicts "
      "of tensors (no pickled modules or other objects) can be read without torch"
    )

  def persistent_load(self, pid: Any) -> _Storage:
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {_short(pid)}")
    if self._storage_for is None:
      raise pickle.UnpicklingError("a storage outside the pickle of the tensors")
    return self._storage_for(*pid[1:])


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40


def _short(value: Any) -> str:
  """A bounded repr of a value from the file (any depth, any size)."""
  try:
    return _REPR.repr(value)
  except Exception:  # noqa: BLE001 - e.g. an int too long to print.
    return f"<{type(value).__name__}>"


def _text(error: BaseException) -> str:
  try:
    return str(error)
  except Exception:  # noqa: BLE001
    return ""


def _one_line(text: str, limit: int = 400) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _unpickle(file: io.BytesIO, storage_for=None) -> Any:
  """One pickle from `file` (left just after it); any failure is a TorchFileError."""
  try:
    return _RestrictedUnpickler(file, storage_for).load()
  except (TorchFileError, MemoryError):
    raise
  except pickle.UnpicklingError as e:
    raise TorchFileError(f"bad pickle: {_text(e)}") from e
  except EOFError as e:
    raise TorchFileError(
      f"bad pickle: it ends early (truncated, or longer than the {_MAX_PICKLE_BYTES >> 20} MiB a "
      "state dict's pickle may take)"
    ) from e
  except KeyError as e:  # The pure-Python unpickler's dispatch table has no such opcode.
    raise TorchFileError(f"bad pickle: unknown opcode {_text(e)}") from e
  except _FILE_ERRORS as e:
    raise TorchFileError(f"bad pickle ({type(e).__name__}: {_text(e)})") from e


def _count(value: Any, what: str) -> int:
  if type(value) is not int or not 0 <= value <= _MAX_COUNT:
    raise TorchFileError(f"{what} {_short(value)} is not an integer in [0, 2**62]")
  return value


def _counts(values: Any, what: str) -> tuple[int, ...]:
  if not isinstance(values, tuple | list) or len(values) > _MAX_DIMS:
    raise TorchFileError(f"{what} {_short(values)} is not a tuple of at most {_MAX_DIMS} ints")
  return tuple(_count(value, what) for value in values)


def _storage_type(value: Any) -> _StorageType:
  if not isinstance(value, _StorageType):
    raise TorchFileError(f"storage type {_short(value)} is not a torch storage class")
  return value


def _check_tensor(name: str, ref: Any) -> _View:
  """A `_TensorRef` -> a `_View` whose numbers are sane and which lies inside its storage."""
  if not isinstance(ref, _TensorRef):
    raise TorchFileError(f"{name} is {_short(ref)}, not a tensor")
  storage = ref.storage
  if not isinstance(storage, _Storage):
    raise TorchFileError(f"{name}: its storage is {_short(storage)}, not a persistent storage")
  if ref.dtype is None:
    dtype = storage.dtype
  elif isinstance(ref.dtype, _TorchDtype):
    dtype = ref.dtype.dtype
  else:
    raise TorchFileError(f"{name}: dtype {_short(ref.dtype)} is not a torch dtype")
  offset = _count(ref.offset, f"{name}: storage offset")
  shape = _counts(ref.size, f"{name}: size")
  stride = _counts(ref.stride, f"{name}: stride")
  if len(shape) != len(stride):
    raise TorchFileError(f"{name}: size {shape} and stride {stride} differ in length")
  view = _View(storage, dtype, offset, shape, stride)
  if view.end > storage.nbytes:
    raise TorchFileError(
      f"{name} (offset {offset}, size {shape}, stride {stride}, {dtype}) overruns its storage "
      f"{storage.key!r} of {storage.nbytes} bytes"
    )
  return view


# -- Reading: the two file formats. -------------------------------------------------------------


class _ZipFile:
  """A zip-format file: its object (tensors as `_TensorRef`) and its storages' records."""

  def __init__(self, file: io.BufferedReader, file_size: int):
    self.file_size = file_size
    self.archive = zipfile.ZipFile(file)
    self.members = {info.filename: info for info in self.archive.infolist()}
    pickles = [n for n in self.members if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise TorchFileError(f"expected one '<archive>/data.pkl' in the zip, found {len(pickles)}")
    self.prefix = pickles[0][: -len("data.pkl")]
    self.little_endian = self._byteorder() == "little"
    self.obj = _unpickle(io.BytesIO(self._read(pickles[0], _MAX_PICKLE_BYTES)), self._storage)

  def _info(self, name: str) -> zipfile.ZipInfo:
    if name not in self.members:
      raise TorchFileError(f"the zip has no member {_short(name)}")
    return self.members[name]

  def _read(self, name: str, size: int, *, exact: bool = False) -> bytes:
    """The first `size` bytes of member `name` (all of it, if shorter and not `exact`); no
    more is ever inflated, whatever its header or its compressed data claim."""
    info = self._info(name)
    if not exact and info.file_size > size:
      raise TorchFileError(f"member {name!r} holds {info.file_size} bytes, more than {size}")
    size = min(size, info.file_size)
    with self.archive.open(info) as member:
      data = member.read(size)
    if len(data) != size:
      raise TorchFileError(f"member {name!r} is truncated: {len(data)} of {size} bytes")
    return data

  def _byteorder(self) -> str:
    name = self.prefix + "byteorder"
    if name not in self.members:
      return "little"  # Files of torch < 1.10 have no byteorder record: little-endian.
    value = self._read(name, 16).decode("ascii").strip()
    if value not in ("little", "big"):
      raise TorchFileError(f"unknown byteorder {value!r} (expected 'little' or 'big')")
    return value

  def _storage(self, storage_type=None, key=None, location=None, numel=None, *rest) -> _Storage:
    del location
    if rest or not isinstance(key, str):
      raise TorchFileError(f"bad storage persistent id (key {_short(key)}, {len(rest)} extra)")
    storage_type = _storage_type(storage_type)
    nbytes = _count(numel, f"storage {key!r}: element count") * storage_type.dtype.itemsize
    info = self._info(f"{self.prefix}data/{key}")
    if info.file_size != nbytes:
      raise TorchFileError(
        f"member {info.filename!r} holds {info.file_size} bytes; its storage declares {numel} "
        f"elements of {storage_type.dtype.itemsize} bytes"
      )
    return _Storage(key, storage_type.dtype, nbytes)

  def read(self, key: str, end: int) -> bytes:
    """Bytes [0, end) of storage `key`'s record."""
    return self._read(f"{self.prefix}data/{key}", end, exact=True)


class _LegacyFile:
  """A legacy-format file: its object (tensors as `_TensorRef`) and its storages' records."""

  def __init__(self, file: io.BufferedReader, file_size: int):
    self.file, self.file_size = file, file_size
    head = io.BytesIO(file.read(_MAX_PICKLE_BYTES))  # The pickles precede all storage data.
    try:
      magic = _unpickle(head)
    except TorchFileError as e:
      raise TorchFileError(f"not a PyTorch zip or legacy file ({e})") from e
    if type(magic) is not int or magic != _LEGACY_MAGIC:
      raise TorchFileError(
        "not a PyTorch save (wrong magic number; the pre-0.4 tar format and plain pickles are "
        "not supported)"
      )
    protocol = _unpickle(head)
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
      raise TorchFileError(f"unsupported legacy protocol version {_short(protocol)}")
    sys_info = _unpickle(head)
    little_endian = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else None
    if not isinstance(little_endian, bool):
      raise TorchFileError(f"bad system info {_short(sys_info)}")
    self.little_endian = little_endian
    self.declared: dict[str, tuple[np.dtype, int]] = {}
    self.obj = _unpickle(head, self._storage)
    keys = _unpickle(head)
    self.offsets = self._find_records(keys, head.tell(), file_size)

  def _storage(
    self, storage_type=None, key=None, location=None, numel=None, view_metadata=None, *rest
  ) -> _Storage:
    del location
    if rest or not isinstance(key, str):
      raise TorchFileError(f"bad storage persistent id (key {_short(key)}, {len(rest)} extra)")
    dtype = _storage_type(storage_type).dtype
    numel = _count(numel, f"storage {key!r}: element count")
    if self.declared.setdefault(key, (dtype, numel)) != (dtype, numel):
      raise TorchFileError(f"storage {key!r} is declared with two types or sizes")
    if view_metadata is None:
      return _Storage(key, dtype, numel * dtype.itemsize)
    if not isinstance(view_metadata, tuple | list) or len(view_metadata) != 3:
      raise TorchFileError(f"storage {key!r}: bad view metadata {_short(view_metadata)}")
    offset = _count(view_metadata[1], f"storage {key!r}: view offset")
    size = _count(view_metadata[2], f"storage {key!r}: view size")
    if offset + size > numel:
      raise TorchFileError(f"storage {key!r}: view [{offset}, {offset + size}) past {numel}")
    return _Storage(key, dtype, size * dtype.itemsize, offset * dtype.itemsize)

  def _find_records(self, keys: Any, position: int, file_size: int) -> dict[str, int]:
    """Storage key -> byte position of its data, checking each record's element count."""
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
      raise TorchFileError(f"the storage keys {_short(keys)} are not a list of strings")
    if len(set(keys)) != len(keys) or set(keys) != set(self.declared):
      raise TorchFileError(
        f"the storage keys {_short(keys)} are not those of the tensors "
        f"({_short(sorted(self.declared))})"
      )
    order = "<" if self.little_endian else ">"
    offsets = {}
    for key in keys:
      dtype, numel = self.declared[key]
      self.file.seek(position)
      (count,) = struct.unpack(order + "q", self.file.read(8))
      if count != numel:
        raise TorchFileError(f"storage {key!r} holds {count} elements; its tensors say {numel}")
      offsets[key] = position + 8
      position += 8 + numel * dtype.itemsize
      if position > file_size:
        raise TorchFileError(f"truncated: storage {key!r} ends at byte {position} of {file_size}")
    return offsets

  def read(self, key: str, end: int) -> bytes:
    """Bytes [0, end) of storage `key`'s record."""
    self.file.seek(self.offsets[key])
    data = self.file.read(end)
    if len(data) != end:
      raise TorchFileError(f"storage {key!r} is truncated")
    return data


# Everything a malformed file can raise while it is parsed or read.
_FILE_ERRORS: tuple[type[BaseException], ...] = (
  ValueError,  # TorchFileError, UnicodeDecodeError, np.frombuffer...
  pickle.UnpicklingError,
  zipfile.BadZipFile,  # Bad CRC-32, bad headers.
  zlib.error,
  LookupError,  # KeyError, IndexError.
  struct.error,
  EOFError,
  OverflowError,
  RuntimeError,  # RecursionError; NotImplementedError (compression); encrypted members.
  MemoryError,
  TypeError,
  AttributeError,
  OSError,  # Seeks before the start of the file, bz2 streams.
)
with contextlib.suppress(ImportError):
  import lzma

  _FILE_ERRORS += (lzma.LZMAError,)


def _problem(error: BaseException) -> str:
  """One line saying what is wrong with the file, from any of `_FILE_ERRORS`."""
  text = _text(error)
  if isinstance(error, TorchFileError):
    return _one_line(text)
  if isinstance(error, EOFError | struct.error):
    return _one_line(f"truncated ({type(error).__name__}: {text})")
  if isinstance(error, zipfile.BadZipFile | zlib.error):
    return _one_line(f"corrupt zip archive ({text})")
  if isinstance(error, MemoryError):
    return "ran out of memory reading it (MemoryError)"
  if isinstance(error, RecursionError):
    return "nested too deeply to read (RecursionError)"
  return _one_line(f"{type(error).__name__}: {text}")


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator[_ZipFile | _LegacyFile]:
  """The parsed file; any failure inside the block is one TorchFileError naming the file.
  (Opening it raises the usual OSError: FileNotFoundError, IsADirectoryError...)"""
  with open(path, "rb") as file:
    try:
      signature, file_size = file.read(len(_ZIP_SIGNATURE)), os.fstat(file.fileno()).st_size
      file.seek(0)
      if signature == _ZIP_SIGNATURE:
        yield _ZipFile(file, file_size)
      else:
        yield _LegacyFile(file, file_size)
    except _FILE_ERRORS as e:
      raise TorchFileError(f"{os.fspath(path)}: {_problem(e)}") from e


class _Walk:
  """Maps the leaves of type `leaf_type` in nested dicts, lists and tuples by `leaf`: each shared
  object once (by identity, so sharing survives and 64 levels of lists holding their child twice
  take 128 steps, not 2**64), at most `_MAX_DEPTH` deep and `_MAX_ELEMENTS` entries in all."""

  def __init__(self, leaf_type: type, leaf: Callable[[Any], Any]):
    self.leaf_type, self.leaf = leaf_type, leaf
    self.memo: dict[int, Any] = {}
    self.elements = 0

  def __call__(self, obj: Any, depth: int = 0) -> Any:
    if id(obj) in self.memo:
      return self.memo[id(obj)]
    if isinstance(obj, self.leaf_type):
      out = self.leaf(obj)
    elif isinstance(obj, dict | list | tuple):
      if depth >= _MAX_DEPTH:
        raise TorchFileError(f"containers nested deeper than {_MAX_DEPTH} levels")
      self.elements += len(obj)
      if self.elements > _MAX_ELEMENTS:
        raise TorchFileError(f"more than {_MAX_ELEMENTS} container entries")
      out = self._container(obj, depth)
    else:
      return obj  # Strings, numbers, None, stand-ins of storage types and dtypes.
    self.memo[id(obj)] = out
    return out

  def _container(self, obj: dict | list | tuple, depth: int) -> Any:
    if isinstance(obj, tuple):
      return tuple(self(value, depth + 1) for value in obj)
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else type(obj)()
    self.memo[id(obj)] = out  # Before the children: a list may hold itself.
    if isinstance(obj, dict):
      for key, value in obj.items():
        out[key] = self(value, depth + 1)
    else:
      out.extend(self(value, depth + 1) for value in obj)
    return out


# -- Reading: materialising checked tensors. ----------------------------------------------------


def _decode(view: _View, data: bytes, little_endian: bool) -> np.ndarray:
  """The array of `view` from its storage's bytes: native byte order, C-contiguous, owned."""
  dtype, itemsize = view.dtype, view.dtype.itemsize
  if not math.prod(view.shape):
    return np.zeros(view.shape, dtype)
  swap = itemsize > 1 and little_endian != (sys.byteorder == "little")
  order = "<" if little_endian else ">"
  if swap and dtype.kind == "V":  # bfloat16 has no byte-order variants: swap as uints.
    stored = np.dtype(f"{order}u{itemsize}")
  else:
    stored = dtype.newbyteorder(order) if swap else dtype
  flat = np.frombuffer(data, stored, count=len(data) // itemsize)
  strided = np.lib.stride_tricks.as_strided(
    flat[view.offset :], shape=view.shape, strides=[s * itemsize for s in view.stride]
  )
  if swap and dtype.kind == "V":
    return strided.astype(f"=u{itemsize}").view(dtype)
  return np.array(strided, dtype=dtype.newbyteorder("="))


def _materialise(source: _ZipFile | _LegacyFile, views: Sequence[_View]) -> list[np.ndarray]:
  """The arrays of `views`, reading each storage once and only as far as they need: in all at
  most the file's size plus the arrays' bytes (a stored zip never needs more; a compressed member
  that claims more is a bomb)."""
  ends: dict[str, int] = {}
  for view in views:
    if view.end:
      key = view.storage.key
      ends[key] = max(ends.get(key, 0), view.storage.start + view.end)
  span, limit = sum(ends.values()), source.file_size + sum(view.nbytes for view in views)
  if span > limit:
    raise TorchFileError(
      f"its tensors span {span} bytes of storage, more than the file's size plus their own "
      f"{limit - source.file_size} bytes"
    )
  data = {key: source.read(key, end) for key, end in ends.items()}
  return [
    _decode(
      view, memoryview(data.get(view.storage.key, b""))[view.storage.start :], source.little_endian
    )
    for view in views
  ]


def _check_budget(views: Sequence[_View], max_bytes: int | None, file_size: int) -> None:
  if max_bytes is None:
    max_bytes = 4 * file_size + _DEFAULT_BUDGET
  need = sum(view.nbytes for view in views)
  if need > max_bytes:
    raise TorchFileError(
      f"its tensors would take {need} bytes, more than the {max_bytes} allowed (pass the "
      "expected shapes, or a larger max_bytes, to read it)"
    )


def _state_dict_views(source: _ZipFile | _LegacyFile) -> dict[str, _View]:
  """The checked tensors of a flat state dict (unwrapping {'state_dict': ...}), in file order."""
  obj = source.obj
  if isinstance(obj, Mapping) and len(obj) == 1 and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise TorchFileError(f"holds {_short(obj)}, not a state dict of tensors")
  if len(obj) > _MAX_ELEMENTS:
    raise TorchFileError(f"more than {_MAX_ELEMENTS} entries")
  views = {}
  for name, ref in obj.items():
    if not isinstance(name, str):
      raise TorchFileError(f"state dict key {_short(name)} is not a string")
    views[name] = _check_tensor(f"tensor {_short(name)}", ref)
  return views


def _select(views: Mapping[str, _View], expected: Mapping[str, tuple]) -> dict[str, _View]:
  """The views `expected` names; their shapes (and dtypes, unless None) as it says."""
  problems = []
  for name, (shape, dtype) in expected.items():
    if name not in views:
      problems.append(f"no tensor {_short(name)}")
    elif views[name].shape != tuple(shape):
      problems.append(f"tensor {_short(name)} has shape {views[name].shape}, expected {shape}")
    elif dtype is not None and views[name].dtype != np.dtype(dtype):
      problems.append(f"tensor {_short(name)} has dtype {views[name].dtype}, expected {dtype}")
  if problems:
    more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
    raise TorchFileError("; ".join(problems[:3]) + more)
  return {name: views[name] for name in expected}


def read_header(path: str | os.PathLike) -> dict[str, TensorSpec]:
  """Name -> (shape, dtype) of a saved state dict, in file order; no tensor data is read."""
  with _opened(path) as source:
    return {name: TensorSpec(v.shape, v.dtype) for name, v in _state_dict_views(source).items()}


def load_state_dict(
  path: str | os.PathLike,
  expected: Mapping[str, tuple[tuple[int, ...], Any]] | None = None,
  max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
  """Reads a saved state dict -> {name: numpy array} (a {'state_dict': ...} wrapper is unwrapped).

  Args:
    path: a torch.save file, zip or legacy format.
    expected: name -> (shape, dtype or None). When given, these names must be in the file with
      these shapes (and dtypes), checked before any array is made; only they are read, in this
      order, and other tensors in the file are ignored.
    max_bytes: without `expected`, the most bytes all arrays together may take (default: 4x the
      file's size + 64 MiB).
  Raises:
    TorchFileError: the file is malformed or does not hold what `expected` says (one line).
  """
  with _opened(path) as source:
    views = _state_dict_views(source)
    if expected is not None:
      views = _select(views, expected)
    else:
      _check_budget(list(views.values()), max_bytes, source.file_size)
    return dict(zip(views, _materialise(source, list(views.values())), strict=True))


def load(path: str | os.PathLike, max_bytes: int | None = None) -> Any:
  """Reads any structure of dicts, lists and tuples of tensors; tensors become numpy arrays (at
  most `max_bytes` in all, default 4x the file's size + 64 MiB)."""
  with _opened(path) as source:
    count = iter(range(_MAX_ELEMENTS + 1))
    checked = _Walk(_TensorRef, lambda ref: _check_tensor(f"tensor #{next(count)}", ref))
    structure = checked(source.obj)
    views = [checked.memo[i] for i in checked.memo if isinstance(checked.memo[i], _View)]
    _check_budget(views, max_bytes, source.file_size)
    arrays = dict(zip(map(id, views), _materialise(source, views), strict=True))
    return _Walk(_View, lambda view: arrays[id(view)])(structure)
