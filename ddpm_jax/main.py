"""The command line: `python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.training.batch_size=8`. Rerunning the same
command resumes from the latest checkpoint in `--workdir`.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import compilation_cache, file_io, xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples (local or gs://).")
flags.DEFINE_enum(
    "mode", "train", ["train", "sample", "eval", "figures"],
    "train: train (resuming); sample: sample.num_samples samples as .npz shards; eval: bits/dim, "
    "rate-distortion, FID/IS (eval.watch: each checkpoint as it appears); figures: Figs. 6-9.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_string(
    "compilation_cache_dir", compilation_cache.DEFAULT_DIR,
    "JAX's persistent compilation cache: a restart loads the compiled steps ('' = off).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Drops Orbax's per-save INFO lines; its warnings and errors still show, without tracebacks
  (a failed save ends in our own one-line error)."""

  def filter(self, record) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING


def _config_load_error(error: Exception, argv: list[str]) -> str:
  """One line for a --config file that cannot be loaded or an override naming no field."""
  config_arg = next((a for a in argv if a.startswith("--config=")), "--config=")
  path = config_arg.partition("=")[2].split(":")[0]
  if path and not os.path.isfile(path):
    return f"{config_arg}: no such file."
  if isinstance(error, (AttributeError, KeyError)):
    name = str(error).strip("'\"")
    bad = [a.partition("=")[0] for a in argv
           if a.startswith("--config.") and name in a.partition("=")[0].split(".")]
    if bad:
      return (f"{bad[0]}: no such config field ({name!r}); configs/default.py lists every field "
              "and its default.")
  if isinstance(error, AttributeError) and not isinstance(FLAGS["config"].value,
                                                          ml_collections.ConfigDict):
    return f"{config_arg}: its get_config() must return an ml_collections.ConfigDict."
  first_line = (str(error).strip().splitlines() or [""])[0]
  return f"{config_arg} could not be loaded: {type(error).__name__}: {first_line}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a bad flag, config file or config override ends in one line, exit 2."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.to_dict()  # A config file that failed to load raises here, not at parse time.
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    print(f"error: {' '.join(lines[:1] + lines[1:][-1:])}\nPass --helpshort to see the flags.",
          file=sys.stderr)
    sys.exit(2)
  except (OSError, AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
    print(f"error: {_config_load_error(e, argv)}", file=sys.stderr)
    sys.exit(2)
  return rest


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
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that --help is fast and TensorFlow never sees the accelerators.
  from ddpm_jax import (  # input_pipeline hides GPUs/TPUs from TensorFlow before it uses them.
    checkpointing,
    config_validation,
    distributed,
    evaluate,
    figures,
    input_pipeline,
    sample,
    train,
  )
  from ddpm_jax.metrics.inception import MissingWeightsError

  distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  compilation_cache.enable(FLAGS.compilation_cache_dir)
  user_errors = (config_validation.ConfigError, input_pipeline.DatasetNotPreparedError,
                 checkpointing.IncompatibleCheckpointError, checkpointing.CorruptCheckpointError,
                 checkpointing.CheckpointSaveError, train.NonFiniteLossError,
                 train.NothingToTrainError, sample.NoCheckpointError, sample.StaleSamplesError,
                 MissingWeightsError, file_io.WorkdirError)
  config, workdir = _with_absolute_paths(FLAGS.config), file_io.absolute(FLAGS.workdir)
  try:
    # The global train batch must divide over the devices only when training.
    training = FLAGS.mode == "train"
    config_validation.validate_config(
        config, device_count=jax.device_count() if training else 1,
        process_count=jax.process_count() if training else 1)
    if FLAGS.mode == "train":
      train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "sample":
      print(f"Samples: {sample.run_sampling(config, workdir)}", flush=True)
    elif FLAGS.mode == "figures":
      for name, path in figures.write_figures(config, workdir).items():
        print(f"{name}: {path}", flush=True)
    elif config.eval.watch:
      print(f"Evaluated steps: {evaluate.watch(config, workdir)}", flush=True)
    else:
      evaluate.run_eval(config, workdir)
  except user_errors as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
