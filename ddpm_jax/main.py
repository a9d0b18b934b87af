"""The command line: `python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.training.batch_size=8`. Rerunning the same
command resumes from the latest checkpoint in `--workdir`.
"""

from __future__ import annotations

import logging as std_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import compilation_cache, xla_flags

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
  """Drops Orbax's per-save INFO lines; its warnings and errors still show."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


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
                 checkpointing.IncompatibleCheckpointError, train.NonFiniteLossError,
                 sample.NoCheckpointError, MissingWeightsError)
  config, workdir = FLAGS.config, FLAGS.workdir
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
  app.run(main)
