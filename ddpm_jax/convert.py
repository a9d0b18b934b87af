"""Weights in and out: the official DDPM weights (TF1 checkpoints or diffusers' UNet2DModel) as a
run's checkpoint, and a run's weights as a diffusers pipeline. The command line, and the library
API of the `weights` package.

  python -m ddpm_jax.convert --source=tf --input=diffusion_cifar10_model/model.ckpt-790000 \
      --config=configs/cifar10.py --workdir=/tmp/ddpm_cifar10_official
  python -m ddpm_jax.convert --source=diffusers --input=ddpm-cifar10-32/ \
      --config=configs/cifar10.py --workdir=/tmp/ddpm_cifar10_diffusers
  python -m ddpm_jax.main --mode=sample --config=configs/cifar10.py \
      --workdir=/tmp/ddpm_cifar10_official
  python -m ddpm_jax.convert --to=diffusers --workdir=/tmp/ddpm_cifar10 --output=/tmp/ddpm_hf

Import (`--source`): the result is `<workdir>/checkpoints/<step>`, a full train state whose
`params` and `ema_params` are both the imported weights (fresh optimizer state), so
`--mode=sample|eval|figures` use it as is and `--mode=train` fine-tunes from it. The step is the
TF checkpoint's (model.ckpt-790000 -> 790000), else 0, or `--step` (>= 0); an existing checkpoint
of that step is never overwritten. Weight files come from the internet: names, shapes and dtypes
are checked against the config's U-Net before any tensor is read (`weights.files`); a malformed
file ends in one line naming it.

Export (`--to=diffusers`, `weights.export`): the EMA params (`--ema=false`: the raw ones) of the
latest checkpoint in `--workdir` (or `--step`) as a directory that
`diffusers.DDPMPipeline.from_pretrained(--output)` loads, with a model card. The config is the
run's own `<workdir>/config.json`; `--config` replaces it (a workdir of imported weights has
none). A config field diffusers cannot express, or a non-empty `--output` without
`--overwrite`, ends in one line before anything is written.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from ddpm_jax import file_io
from ddpm_jax.runtime import command_line
from ddpm_jax.weights.diffusers import (
  ddpm_scheduler_config,
  from_diffusers,
  load_diffusers_state_dict,
  to_diffusers_state_dict,
  unet2d_config,
)
from ddpm_jax.weights.export import export_run, to_diffusers
from ddpm_jax.weights.importer import convert, save_checkpoint
from ddpm_jax.weights.matching import ConversionError
from ddpm_jax.weights.tf1 import from_tf_checkpoint

__all__ = [
  "ConversionError",
  "convert",
  "ddpm_scheduler_config",
  "export_run",
  "from_diffusers",
  "from_tf_checkpoint",
  "load_diffusers_state_dict",
  "save_checkpoint",
  "to_diffusers",
  "to_diffusers_state_dict",
  "unet2d_config",
]


def _define_flags() -> None:
  """The flags, defined only when run as a program (importing this module defines none)."""
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_enum(
    "source",
    None,
    ["tf", "diffusers"],
    "Import: tf, an original TF1 checkpoint; diffusers, a UNet2DModel's safetensors.",
  )
  flags.DEFINE_enum(
    "to",
    None,
    ["diffusers"],
    "Export: diffusers, a DDPMPipeline directory (--workdir's run to --output).",
  )
  flags.DEFINE_string(
    "input",
    None,
    "Import: tf, the checkpoint prefix (model.ckpt-790000) or its directory; diffusers, "
    "diffusion_pytorch_model.safetensors (or .bin) or its directory.",
  )
  config_flags.DEFINE_config_file(
    "config",
    None,
    "The config whose U-Net the weights fit. Export: default <workdir>/config.json.",
    lock_config=True,
  )
  flags.DEFINE_string(
    "workdir", None, "Import: writes <workdir>/checkpoints/<step>. Export: the run to read."
  )
  flags.DEFINE_string("output", None, "Export: the directory to write (empty or new).")
  flags.DEFINE_bool("overwrite", False, "Export: replace an export already in --output.")
  flags.DEFINE_integer(
    "step",
    None,
    "Import: the checkpoint step to write, >= 0 (default: the TF checkpoint's, else 0). "
    "Export: the checkpoint to read (default: the latest).",
  )
  flags.DEFINE_bool(
    "ema",
    True,
    "Import (tf): take the ExponentialMovingAverage copies when present. Export: the EMA "
    "params; --ema=false exports the raw ones.",
  )


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _check_flags(f: Any) -> None:
  """One line for a missing, extra or conflicting flag."""
  if (f.source is None) == (f.to is None):
    _fail(
      "pass --source=tf|diffusers to import weights into a run, or --to=diffusers to export "
      "a run's weights (not both)."
    )
  command = f"--source={f.source}" if f.source else f"--to={f.to}"
  needed = ["input", "config", "workdir"] if f.source else ["workdir", "output"]
  unused = ["output", "overwrite"] if f.source else ["input"]
  missing = [f"--{name}" for name in needed if f[name].value is None]
  if missing:
    _fail(f"{command} needs {' and '.join(missing)}.")
  extra = [f"--{name}" for name in unused if f[name].present]
  if extra:
    _fail(f"{' and '.join(extra)} cannot be used with {command}.")
  if f.step is not None and f.step < 0:  # Orbax would write a step no mode can load.
    _fail(f"--step must be >= 0, got {f.step}; nothing was written.")


def _import(f: Any) -> None:
  from ml_collections import config_flags

  input_path, workdir = file_io.absolute(f.input), file_io.absolute(f.workdir)
  try:  # The config is validated by the mode that later uses the checkpoint.
    path = convert(f.source, input_path, f.config, workdir, f.step, f.ema)
  except (ConversionError, FileNotFoundError, FileExistsError) as e:
    _fail(str(e))
  config_file = config_flags.get_config_filename(f["config"])
  print(
    f"Wrote {path}. Sample with: python -m ddpm_jax.main --mode=sample "
    f"--config={config_file} --workdir={workdir}",
    flush=True,
  )


def _export(f: Any) -> None:
  from ddpm_jax.checkpoints import checkpointer
  from ddpm_jax.config.validation import ConfigError

  try:
    directory, step = export_run(
      f.workdir, f.output, step=f.step, use_ema=f.ema, config=f.config, overwrite=f.overwrite
    )
  except (
    ConversionError,
    ConfigError,
    FileNotFoundError,  # No config.json, no checkpoint (of --step).
    FileExistsError,
    file_io.WorkdirError,
    checkpointer.CorruptCheckpointError,
    checkpointer.IncompatibleCheckpointError,  # --config of another U-Net than the run's.
  ) as e:
    _fail(str(e))
  print(
    f"Wrote {directory} ({'EMA' if f.ema else 'raw'} params of step {step}). Load it with: "
    f'diffusers.DDPMPipeline.from_pretrained("{directory}")',
    flush=True,
  )


def main(argv: list[str]) -> None:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  command_line.quiet_library_logs()
  _check_flags(flags.FLAGS)
  if flags.FLAGS.source:
    _import(flags.FLAGS)
  else:
    _export(flags.FLAGS)


def _parse_flags(argv: list[str]) -> list[str]:
  """`command_line.parse_flags`, where --config may be left out (an export reads the run's
  config.json)."""
  from absl import flags

  names = [arg.split("=")[0] for arg in argv[1:]]
  if "--config" in names or "-config" in names:
    return command_line.parse_flags(argv)
  overrides = [name for name in names if name.startswith("--config.")]
  if overrides:
    _fail(
      f"{overrides[0]} needs --config=FILE: overrides change a config file (without "
      "--config, an export uses the run's config.json as it is)."
    )
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{str(e).splitlines()[0]}\nPass --helpshort to see the flags.")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main, flags_parser=_parse_flags)
