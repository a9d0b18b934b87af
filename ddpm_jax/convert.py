"""Weights in: the official DDPM weights (TF1 checkpoints or diffusers' UNet2DModel) as a run's
checkpoint. The command line, and the library API of the `weights` package.

  python -m ddpm_jax.convert --source=tf --input=diffusion_cifar10_model/model.ckpt-790000 \
      --config=configs/cifar10.py --workdir=/tmp/ddpm_cifar10_official
  python -m ddpm_jax.convert --source=diffusers --input=ddpm-cifar10-32/ \
      --config=configs/cifar10.py --workdir=/tmp/ddpm_cifar10_diffusers
  python -m ddpm_jax.main --mode=sample --config=configs/cifar10.py \
      --workdir=/tmp/ddpm_cifar10_official

The result is `<workdir>/checkpoints/<step>`, a full train state whose `params` and `ema_params`
are both the imported weights (fresh optimizer state), so `--mode=sample|eval|figures` use it as
is and `--mode=train` fine-tunes from it. The step is the TF checkpoint's (model.ckpt-790000 ->
790000), else 0, or `--step` (>= 0); an existing checkpoint of that step is never overwritten.

Weight files come from the internet: names, shapes and dtypes are checked against the config's
U-Net before any tensor is read (`weights.files`); a malformed file ends in one line naming it.
"""

from __future__ import annotations

import sys

from ddpm_jax import file_io
from ddpm_jax.runtime import command_line
from ddpm_jax.weights.diffusers import from_diffusers, load_diffusers_state_dict
from ddpm_jax.weights.importer import convert, save_checkpoint
from ddpm_jax.weights.matching import ConversionError
from ddpm_jax.weights.tf1 import from_tf_checkpoint

__all__ = [
  "ConversionError",
  "convert",
  "from_diffusers",
  "from_tf_checkpoint",
  "load_diffusers_state_dict",
  "save_checkpoint",
]


def _define_flags() -> None:
  """The flags, defined only when run as a program (importing this module defines none)."""
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_enum(
    "source",
    None,
    ["tf", "diffusers"],
    "tf: an original TF1 checkpoint; diffusers: a UNet2DModel's safetensors.",
  )
  flags.DEFINE_string(
    "input",
    None,
    "tf: the checkpoint prefix (model.ckpt-790000) or its "
    "directory; diffusers: diffusion_pytorch_model.safetensors (or .bin) or its "
    "directory.",
  )
  config_flags.DEFINE_config_file(
    "config", None, "The config whose U-Net the weights fit.", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Writes <workdir>/checkpoints/<step>.")
  flags.DEFINE_integer(
    "step", None, "Checkpoint step, >= 0 (default: the TF checkpoint's, else 0)."
  )
  flags.DEFINE_bool(
    "ema",
    True,
    "tf: take the ExponentialMovingAverage copies when present; --noema takes the raw weights.",
  )
  flags.mark_flags_as_required(["source", "input", "config", "workdir"])


def main(argv: list[str]) -> None:
  from absl import app, flags
  from ml_collections import config_flags

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  command_line.quiet_library_logs()
  f = flags.FLAGS
  if f.step is not None and f.step < 0:  # Orbax would write a step no mode can load.
    print(f"error: --step must be >= 0, got {f.step}; nothing was written.", file=sys.stderr)
    sys.exit(2)
  input_path, workdir = file_io.absolute(f.input), file_io.absolute(f.workdir)
  try:  # The config is validated by the mode that later uses the checkpoint.
    path = convert(f.source, input_path, f.config, workdir, f.step, f.ema)
  except (ConversionError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  config_file = config_flags.get_config_filename(f["config"])
  print(
    f"Wrote {path}. Sample with: python -m ddpm_jax.main --mode=sample "
    f"--config={config_file} --workdir={workdir}",
    flush=True,
  )


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main, flags_parser=command_line.parse_flags)
