"""The command line: `python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.training.batch_size=8`. Rerunning the same
command resumes from the latest checkpoint in `--workdir`.
"""

from __future__ import annotations

import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import file_io
from ddpm_jax.runtime import command_line, compilation_cache, xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/cifar10.py.", lock_config=True
)
flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, logs and samples (local or gs://)."
)
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "sample", "eval", "figures"],
  "train: train (resuming); sample: sample.num_samples samples as .npz shards; eval: bits/dim, "
  "rate-distortion, FID/IS (eval.watch: each checkpoint as it appears); figures: Figs. 6-9.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_string(
  "compilation_cache_dir",
  compilation_cache.DEFAULT_DIR,
  "JAX's persistent compilation cache: a restart loads the compiled steps ('' = off).",
)
flags.mark_flags_as_required(["config", "workdir"])


# Config fields that hold local paths (or gs:// ones, kept as they are).
PATH_FIELDS = ("data.data_dir", "eval.inception_weights", "eval.fid_stats_dir")


def _with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with its path fields made absolute against the directory the command ran in."""
  for field in PATH_FIELDS:
    section, name = field.split(".")
    config[section][name] = file_io.absolute(config[section][name])
  return config


def main(argv):
  xla_flags.apply()  # Before JAX starts its backends, which read XLA_FLAGS once.
  command_line.quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that --help is fast; each mode imports what it needs.
  from ddpm_jax.runtime import distributed

  distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  compilation_cache.enable(FLAGS.compilation_cache_dir)
  config, workdir = _with_absolute_paths(FLAGS.config), file_io.absolute(FLAGS.workdir)
  try:
    _run_mode(FLAGS.mode, config, workdir)
  except _user_errors() as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _run_mode(mode: str, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs `mode`, importing only what it needs (sampling imports no TensorFlow or optax)."""
  if mode == "train":
    from ddpm_jax.training import loop

    loop.train_and_evaluate(config, workdir)
  elif mode == "sample":
    from ddpm_jax.sampling import shards

    print(f"Samples: {shards.run_sampling(config, workdir)}", flush=True)
  elif mode == "figures":
    from ddpm_jax.sampling import figures

    for name, path in figures.write_figures(config, workdir).items():
      print(f"{name}: {path}", flush=True)
  else:
    from ddpm_jax.evaluation import evaluate

    if config.eval.watch:
      print(f"Evaluated steps: {evaluate.watch(config, workdir)}", flush=True)
    else:
      evaluate.run_eval(config, workdir)


def _user_errors() -> tuple[type[Exception], ...]:
  """The errors a user can cause: each ends in one line and exit status 2. Modules a mode did not
  import cannot have raised theirs."""
  from ddpm_jax.checkpoints import checkpointer, readers
  from ddpm_jax.config.validation import ConfigError
  from ddpm_jax.evaluation.inception import MissingWeightsError
  from ddpm_jax.sampling.shards import StaleSamplesError

  errors = [
    ConfigError,
    checkpointer.IncompatibleCheckpointError,
    checkpointer.CorruptCheckpointError,
    checkpointer.CheckpointSaveError,
    readers.NoCheckpointError,
    StaleSamplesError,
    MissingWeightsError,
    file_io.WorkdirError,
  ]
  if "ddpm_jax.training.loop" in sys.modules:
    from ddpm_jax.training import loop

    errors += [loop.NonFiniteLossError, loop.NothingToTrainError]
  if "ddpm_jax.data.pipeline" in sys.modules:
    from ddpm_jax.data import pipeline

    errors += [pipeline.DatasetNotPreparedError, pipeline.LabelsError]
  return tuple(errors)


if __name__ == "__main__":
  app.run(main, flags_parser=command_line.parse_flags)
