"""Converts pytorch-fid's FID Inception weights (.pth) to the .npz that `InceptionFeatures` loads.

  python -m ddpm_jax.weights.convert_inception \
    --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

Reads the state dict without torch (`torch_pickle`) and maps its keys 1:1 (see `inception`'s
docstring): conv weights [out, in, kh, kw] -> kernels [kh, kw, in, out], fc.weight [1008, 2048] ->
kernel [2048, 1008], bn weight/bias -> scale/bias, running_mean/var -> batch_stats mean/var.
`num_batches_tracked` entries are ignored. Names, shapes and dtypes are checked from the file's
pickle before any tensor is read; any other difference in keys or shapes ends in one error listing
the missing, unexpected and mis-shaped keys, and a malformed file in one line naming it (exit
status 2, nothing written).
"""

import argparse
import io
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from ddpm_jax import file_io
from ddpm_jax.evaluation import inception
from ddpm_jax.weights import torch_pickle
from ddpm_jax.weights.matching import ConversionError

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def flax_to_torch_key(flax_key: str) -> str:
  """'params/Mixed_5b/branch1x1/conv/kernel' -> 'Mixed_5b.branch1x1.conv.weight', etc."""
  collection, *path, leaf = flax_key.split("/")
  if path[-1] == "bn":
    return ".".join([*path, _BN_NAMES[leaf]])
  if leaf not in ("kernel", "bias") or collection != "params":
    raise KeyError(f"Unknown Inception variable {flax_key}.")
  return ".".join([*path, "weight" if leaf == "kernel" else "bias"])


def _to_torch_layout(flax_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if flax_key.endswith("/kernel"):  # HWIO -> OIHW for convs, [in, out] -> [out, in] for fc.
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
  return shape


def _to_flax_layout(flax_key: str, value: np.ndarray) -> np.ndarray:
  if flax_key.endswith("/kernel"):
    value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return np.ascontiguousarray(value, dtype=np.float32)


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
  """pytorch-fid state-dict key -> shape (torch layout), derived from the Flax model."""
  return {
    flax_to_torch_key(key): _to_torch_layout(key, shape)
    for key, shape in inception.variable_shapes().items()
  }


def check_shapes(shapes: Mapping[str, tuple[int, ...]], what: str = "The state dict") -> None:
  """Raises one ConversionError listing the missing, unexpected and mis-shaped keys of a
  pytorch-fid state dict's {key: shape} (`num_batches_tracked` entries are ignored)."""
  shapes = {k: tuple(v) for k, v in shapes.items() if not k.endswith(".num_batches_tracked")}
  expected = expected_torch_shapes()
  missing = sorted(set(expected) - set(shapes))
  unexpected = sorted(set(shapes) - set(expected))
  misshaped = [
    f"{key}: {shapes[key]}, expected {expected[key]}"
    for key in sorted(set(shapes) & set(expected))
    if shapes[key] != expected[key]
  ]
  if missing or unexpected or misshaped:
    lines = [f"{what} does not match pytorch-fid's FID Inception ({inception.WEIGHTS_FILENAME})."]
    for title, keys in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    ):
      if keys:
        lines.append(f"{len(keys)} {title} keys:")
        lines.extend(f"  {key}" for key in keys)
    raise ConversionError("\n".join(lines))


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid state dict -> flat Flax variables {'params/.../kernel': float32 array}."""
  check_shapes({key: np.shape(value) for key, value in state_dict.items()})
  torch_to_flax = {flax_to_torch_key(key): key for key in inception.variable_shapes()}
  return {
    flax_key: _to_flax_layout(flax_key, np.asarray(state_dict[torch_key]))
    for torch_key, flax_key in torch_to_flax.items()
  }


def save_variables(path: str, flat_variables: Mapping[str, np.ndarray]) -> None:
  """Writes flat Flax variables to an .npz (local or gs://)."""
  buffer = io.BytesIO()
  np.savez(buffer, **flat_variables)
  file_io.write_atomically(path, buffer.getvalue())


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The FID Inception tensors of pytorch-fid's .pth at `path`, checked (names, shapes, floating
  dtypes) before any is read; only they are read.

  Raises:
    torch_pickle.TorchFileError: a malformed file (one line naming it).
    ConversionError: the tensors do not fit the FID Inception.
  """
  specs = torch_pickle.read_header(path)
  check_shapes({key: spec.shape for key, spec in specs.items()}, what=path)
  expected = expected_torch_shapes()
  for key in expected:
    if specs[key].dtype.kind != "f":
      raise ConversionError(f"{path}: tensor {key} has dtype {specs[key].dtype}, not a float.")
  return torch_pickle.load_state_dict(path, {key: (shape, None) for key, shape in expected.items()})


def convert(input_path: str, output_path: str) -> None:
  """Reads the .pth at `input_path` and writes the converted .npz to `output_path`."""
  save_variables(output_path, convert_state_dict(read_state_dict(input_path)))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help=f"pytorch-fid's {inception.WEIGHTS_FILENAME}")
  parser.add_argument("--output", required=True, help="the .npz for eval.inception_weights")
  args = parser.parse_args(argv)
  input_path, output_path = file_io.absolute(args.input), file_io.absolute(args.output)
  try:
    convert(input_path, output_path)
  except (OSError, ValueError) as e:  # TorchFileError, ConversionError: one message, no traceback.
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Wrote {output_path}; use --config.eval.inception_weights={output_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
