"""`--mode=eval`: bits/dim, rate-distortion and sample quality of a checkpoint's EMA params.

With `eval.watch`, evaluates every checkpoint as a training run writes them (like the original's
evaluation worker), each result to TensorBoard at the checkpoint's step; rerunning skips the
steps already evaluated (`<workdir>/eval/evaluated_steps.json`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import tensorflow as tf
from clu import metric_writers

from ddpm_jax import bpd_eval, checkpointing, sample, sample_quality


def _at_step(config: ml_collections.ConfigDict, step: int | None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  if step is not None:
    config.sample.checkpoint_step = step
  return config


def evaluate_sample_quality(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Draws (or reuses) `sample.num_samples` samples and scores them: FID, IS."""
  directory = sample.run_sampling(config, workdir)
  images = sample.load_samples(directory, config.sample.num_samples)
  if jax.process_index() != 0:
    return {}
  result = sample_quality.evaluate_samples(config, images) | {"samples": directory}
  with tf.io.gfile.GFile(os.path.join(directory, "sample_quality.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def run_eval(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
  """Evaluates the checkpoint of `step` (None: `sample.checkpoint_step`, -1: the latest)."""
  config = _at_step(config, step)
  requested = None if config.sample.checkpoint_step < 0 else config.sample.checkpoint_step
  results: dict[str, Any] = {}
  if config.eval.bpd:
    results["bpd"] = bpd_eval.run_bpd_eval(config, workdir, step=requested)
  if config.eval.sample_quality:
    results["sample_quality"] = quality = evaluate_sample_quality(config, workdir)
    if quality:
      writer = metric_writers.create_default_writer(
          workdir, just_logging=jax.process_index() > 0, collection="eval")
      scalars = {f"eval/{k}": v for k, v in quality.items() if isinstance(v, float)}
      writer.write_scalars(_step_of(quality["samples"]), scalars)
      writer.flush()
      print(f"Sample quality ({config.sample.num_samples} samples in {quality['samples']}): "
            + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()), flush=True)
  return results


def _step_of(sample_dir: str) -> int:
  """The checkpoint step encoded in a sample directory's name (samples_step<N>_...)."""
  name = os.path.basename(os.path.normpath(sample_dir))
  return int(name.split("_")[1].removeprefix("step"))


def _done_path(workdir: str) -> str:
  return os.path.join(workdir, "eval", "evaluated_steps.json")


def _read_done(workdir: str) -> list[int]:
  path = _done_path(workdir)
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _write_done(workdir: str, steps: list[int]) -> None:
  if jax.process_index() == 0:
    tf.io.gfile.makedirs(os.path.dirname(_done_path(workdir)))
    with tf.io.gfile.GFile(_done_path(workdir), "w") as f:
      json.dump(sorted(steps), f)


def checkpoint_steps(workdir: str) -> list[int]:
  """The completed checkpoint steps of a run, read without touching the directory."""
  directory = os.path.join(workdir, "checkpoints")
  if not tf.io.gfile.isdir(directory):
    return []
  with checkpointing.Checkpointer(directory, keep=1, every_steps=0, read_only=True) as ckpt:
    return ckpt.all_steps()


def watch(config: ml_collections.ConfigDict, workdir: str, poll_secs: float | None = None,
          timeout_secs: float | None = None) -> list[int]:
  """Evaluates each new checkpoint until the one of `training.num_train_steps` is done."""
  poll_secs = config.eval.watch_poll_secs if poll_secs is None else poll_secs
  done = _read_done(workdir)
  start = time.monotonic()
  while config.training.num_train_steps not in done:
    pending = [s for s in checkpoint_steps(workdir) if s not in done]
    for step in pending:
      logging.info("Evaluating the checkpoint of step %d", step)
      run_eval(config, workdir, step)
      done.append(step)
      _write_done(workdir, done)
    if timeout_secs is not None and time.monotonic() - start > timeout_secs:
      break
    if not pending:
      time.sleep(poll_secs)
  return sorted(done)
