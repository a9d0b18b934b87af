"""Reads and writes `.safetensors` files as numpy arrays, without torch or the safetensors package.

The format (https://huggingface.co/docs/safetensors): an unsigned little-endian 64-bit header
length N, N bytes of JSON `{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
"__metadata__": {str: str}}` (padded with spaces), then the raw little-endian, C-ordered tensor
bytes, each tensor at `data_offsets` relative to the end of the header. `save_file` writes the
tensors back to back in name order, which the real `safetensors` package reads.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

# safetensors dtype name -> little-endian numpy dtype. BF16 and F8 come from ml_dtypes (jax's).
DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}
_TYPE_NAMES = {dtype.type: name for name, dtype in DTYPES.items()}  # Any byte order.
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # The reference implementation's limit.
_ALIGNMENT = 8


class SafetensorsError(ValueError):
  """The file is not a valid safetensors file (or holds a dtype this reader does not know)."""


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict], dict[str, str], int]:
  """(tensor entries by name, `__metadata__`, byte offset of the data) of a safetensors file."""
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise SafetensorsError(f"{path} is not a safetensors file: shorter than 8 bytes.")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > min(_MAX_HEADER_BYTES, file_size - 8):
      raise SafetensorsError(
        f"{path} is not a safetensors file: header length {header_size} exceeds the file.")
    raw = f.read(header_size)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(f"{path} is not a safetensors file: bad JSON header ({e}).") from e
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path} is not a safetensors file: the header is not a JSON object.")
  metadata = header.pop("__metadata__", None) or {}
  data_start = 8 + header_size
  for name, entry in header.items():
    _check_entry(path, name, entry, file_size - data_start)
  return header, metadata, data_start


def _check_entry(path: str | os.PathLike[str], name: str, entry: Any, data_size: int) -> None:
  """Raises SafetensorsError unless `entry` is a well-formed tensor entry within the data."""
  try:
    dtype = DTYPES[entry["dtype"]]
    shape = [int(d) for d in entry["shape"]]
    begin, end = (int(o) for o in entry["data_offsets"])
  except (KeyError, TypeError, ValueError) as e:
    raise SafetensorsError(f"{path}: bad entry for tensor {name!r}: {entry!r} (dtypes known: "
                           f"{', '.join(DTYPES)}).") from e
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != nbytes:
    raise SafetensorsError(
      f"{path}: tensor {name!r} with shape {shape} and dtype {entry['dtype']} does not fit its "
      f"data_offsets [{begin}, {end}] (data size {data_size} bytes).")


def load_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file: name -> numpy array (native byte order, C-ordered)."""
  header, _, data_start = read_header(path)
  if not header:
    return {}
  data_size = os.path.getsize(path) - data_start
  data = (np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if data_size
          else np.zeros(0, np.uint8))
  tensors = {}
  for name, entry in header.items():
    begin, end = entry["data_offsets"]
    tensors[name] = _decode(data[begin:end], DTYPES[entry["dtype"]], tuple(entry["shape"]))
  del data
  return tensors


def _is_ml_dtype(dtype: np.dtype) -> bool:
  """bfloat16 and the float8 types, which have no byte-order variants in numpy."""
  return dtype.type.__module__.startswith("ml_dtypes")


def _decode(raw: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
  """Little-endian bytes [nbytes] uint8 -> a native-order array of `shape` (a copy)."""
  if dtype.itemsize == 1:
    values = raw.view(dtype).copy()
  elif _is_ml_dtype(dtype):  # Swap bytes as unsigned ints of the same size if needed.
    values = raw.view(f"<u{dtype.itemsize}").astype(f"=u{dtype.itemsize}").view(dtype)
  else:
    values = raw.view(dtype).astype(dtype.newbyteorder("="))
  return values.reshape(shape)


def _encode(array: np.ndarray) -> tuple[str, bytes]:
  """(safetensors dtype name, little-endian C-order bytes) of `array`."""
  name = _TYPE_NAMES.get(array.dtype.type)
  if name is None:
    raise SafetensorsError(
      f"cannot store dtype {array.dtype} in safetensors (known: {', '.join(DTYPES)}).")
  dtype = DTYPES[name]
  if dtype.itemsize > 1 and _is_ml_dtype(dtype):
    unsigned = f"u{dtype.itemsize}"
    data = np.ascontiguousarray(array).view(f"={unsigned}").astype(f"<{unsigned}")
  else:
    data = np.ascontiguousarray(array, dtype=dtype)
  return name, data.tobytes()


def save_file(
  tensors: Mapping[str, np.ndarray], path: str | os.PathLike[str],
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes `tensors` (name -> array) to `path` in the safetensors format, in name order."""
  header: dict[str, object] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  chunks, offset = [], 0
  for name in sorted(tensors):
    array = np.asarray(tensors[name])
    dtype_name, data = _encode(array)
    header[name] = {
      "dtype": dtype_name, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % _ALIGNMENT)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for data in chunks:
      f.write(data)
