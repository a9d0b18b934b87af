"""Converts pytorch-fid's FID Inception weights (.pth) to the .npz that `InceptionFeatures` loads.

  python -m ddpm_jax.metrics.convert_inception \
    --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

Reads the state dict without torch (`torch_pickle`) and maps its keys 1:1 (see `inception`'s
docstring): conv weights [out, in, kh, kw] -> kernels [kh, kw, in, out], fc.weight [1008, 2048] ->
kernel [2048, 1008], bn weight/bias -> scale/bias, running_mean/var -> batch_stats mean/var.
`num_batches_tracked` entries are ignored. Any other difference in keys or shapes ends in one
error listing the missing, unexpected and mis-shaped keys.
"""

import argparse
import io
import pickle
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from ddpm_jax.metrics import fid, inception, torch_pickle

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


class ConversionError(ValueError):
  """A state dict that does not fit the FID Inception."""


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


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid state dict -> flat Flax variables {'params/.../kernel': float32 array}."""
  state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
  flax_shapes = inception.variable_shapes()
  torch_to_flax = {flax_to_torch_key(key): key for key in flax_shapes}
  missing = sorted(set(torch_to_flax) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(torch_to_flax))
  misshaped = []
  for torch_key in sorted(set(state_dict) & set(torch_to_flax)):
    want = _to_torch_layout(torch_to_flax[torch_key], flax_shapes[torch_to_flax[torch_key]])
    got = tuple(np.shape(state_dict[torch_key]))
    if got != want:
      misshaped.append(f"{torch_key}: {got}, expected {want}")
  if missing or unexpected or misshaped:
    lines = [
      f"The state dict does not match pytorch-fid's FID Inception ({inception.WEIGHTS_FILENAME})."
    ]
    for title, keys in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    ):
      if keys:
        lines.append(f"{len(keys)} {title} keys:")
        lines.extend(f"  {key}" for key in keys)
    raise ConversionError("\n".join(lines))
  return {
    flax_key: _to_flax_layout(flax_key, np.asarray(state_dict[torch_key]))
    for torch_key, flax_key in torch_to_flax.items()
  }


def save_variables(path: str, flat_variables: Mapping[str, np.ndarray]) -> None:
  """Writes flat Flax variables to an .npz (local or gs://)."""
  buffer = io.BytesIO()
  np.savez(buffer, **flat_variables)
  fid.write_bytes(path, buffer.getvalue())


def convert(input_path: str, output_path: str) -> None:
  """Reads the .pth at `input_path` and writes the converted .npz to `output_path`."""
  state_dict = torch_pickle.load_state_dict(input_path)
  save_variables(output_path, convert_state_dict(state_dict))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help=f"pytorch-fid's {inception.WEIGHTS_FILENAME}")
  parser.add_argument("--output", required=True, help="the .npz for eval.inception_weights")
  args = parser.parse_args(argv)
  try:
    convert(args.input, args.output)
  except (OSError, ValueError, pickle.UnpicklingError) as e:  # One clear message, no traceback.
    print(f"convert_inception: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {args.output}; use --config.eval.inception_weights={args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
