"""Reading weights files from the internet: .safetensors through the `safetensors` package
(which validates the header, offsets and overlaps), torch .bin through `torch_pickle` (no pickle
runs code). Names, shapes and dtypes are checked before any tensor is read, and only the tensors
asked for are read; a malformed file is one ConversionError naming it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import ml_dtypes  # safetensors' numpy path returns BF16 only once ml_dtypes is imported.
import numpy as np
import safetensors

from ddpm_jax.weights import torch_pickle
from ddpm_jax.weights.matching import ConversionError, Shape, one_line

# The safetensors dtypes its numpy path returns -> numpy (others, e.g. F8, numpy cannot hold).
_SAFETENSORS_DTYPES = {
  name: np.dtype(dtype)
  for name, dtype in {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "C64": np.complex64,
  }.items()
}
FLOAT_DTYPES = frozenset(_SAFETENSORS_DTYPES[name] for name in ("F64", "F32", "F16", "BF16"))


@contextlib.contextmanager
def _reading(filename: str) -> Iterator[None]:
  """Any failure to read the weights file `filename` becomes one ConversionError naming it."""
  try:
    yield
  except ConversionError:
    raise
  except torch_pickle.TorchFileError as e:  # Names the file already.
    raise ConversionError(str(e)) from e
  except (
    safetensors.SafetensorError,
    OSError,
    ValueError,
    TypeError,
    AttributeError,
    OverflowError,
    MemoryError,
  ) as e:
    raise ConversionError(
      f"{filename}: not a readable weights file ({type(e).__name__}: {one_line(e)})"
    ) from e


def weights_header(filename: str) -> dict[str, torch_pickle.TensorSpec]:
  """Name -> (shape, numpy dtype) of the tensors of a .safetensors or torch .bin file, from its
  header (or pickle) alone: no tensor is read. Raises ConversionError (one line) when malformed."""
  with _reading(filename):
    if filename.endswith(".bin"):
      return torch_pickle.read_header(filename)
    specs = {}
    with safetensors.safe_open(filename, framework="numpy") as f:
      names = f.keys()
      for name in names:
        view = f.get_slice(name)
        if view.get_dtype() not in _SAFETENSORS_DTYPES:
          raise ConversionError(
            f"{filename}: tensor {name!r} has dtype {view.get_dtype()}, which numpy cannot hold."
          )
        specs[name] = torch_pickle.TensorSpec(
          tuple(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()]
        )
    return specs


def read_weights(
  filename: str, expected: Mapping[str, Shape] | None = None
) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors or torch .bin file that `expected` (name -> shape) names, each
  checked to be there with its shape before any is read; only they are read. None: all of them
  (a .bin's arrays then take at most 4x the file's size + 64 MiB). Raises ConversionError."""
  with _reading(filename):
    if filename.endswith(".bin"):
      if expected is None:
        return torch_pickle.load_state_dict(filename)
      return torch_pickle.load_state_dict(
        filename, {name: (tuple(shape), None) for name, shape in expected.items()}
      )
    with safetensors.safe_open(filename, framework="numpy") as f:
      names = f.keys()
      if expected is None:
        expected = {name: tuple(f.get_slice(name).get_shape()) for name in names}
      names = set(names)
      for name, shape in expected.items():
        if name not in names:
          raise ConversionError(f"{filename}: no tensor {name!r}.")
        view = f.get_slice(name)
        if tuple(view.get_shape()) != tuple(shape):
          raise ConversionError(
            f"{filename}: tensor {name!r} has shape "
            f"{tuple(view.get_shape())}, expected {tuple(shape)}."
          )
        if view.get_dtype() not in _SAFETENSORS_DTYPES:
          raise ConversionError(
            f"{filename}: tensor {name!r} has dtype {view.get_dtype()}, which numpy cannot hold."
          )
      return {name: f.get_tensor(name) for name in expected}
