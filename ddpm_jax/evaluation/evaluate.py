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
from clu import metric_writers

from ddpm_jax import file_io
from ddpm_jax.checkpoints import readers
from ddpm_jax.config.validation import validate_config
from ddpm_jax.evaluation import bpd, sample_quality
from ddpm_jax.model_bundle import ModelBundle
from ddpm_jax.sampling import shards


def _at_step(config: ml_collections.ConfigDict, step: int | None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  if step is not None:
    config.sample.checkpoint_step = step
  return config


def evaluate_sample_quality(bundle: ModelBundle, workdir: str) -> dict[str, Any]:
  """Draws (or reuses) `sample.num_samples` samples and scores them: FID, IS."""
  config = bundle.config
  directory = shards.sample_checkpoint(bundle, workdir)
  images = shards.load_samples(directory, config.sample.num_samples)
  if jax.process_index() != 0:
    return {}
  labels = shards.load_labels(directory, len(images)) if config.model.num_classes else None
  result = sample_quality.evaluate_samples(config, images, labels) | {"samples": directory}
  file_io.write_atomically(
    os.path.join(directory, "sample_quality.json"), json.dumps(result, indent=2).encode()
  )
  return result


def run_eval(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
  """Evaluates the checkpoint of `step` (None: `sample.checkpoint_step`, -1: the latest)."""
  validate_config(config, mode="eval")
  return _evaluate(ModelBundle.from_config(_at_step(config, step)), file_io.absolute(workdir))


def _evaluate(bundle: ModelBundle, workdir: str) -> dict:
  config = bundle.config
  requested = None if config.sample.checkpoint_step < 0 else config.sample.checkpoint_step
  results: dict[str, Any] = {}
  if config.eval.bpd:
    results["bpd"] = bpd.bpd_of_checkpoint(bundle, workdir, step=requested)
  if config.eval.sample_quality:
    results["sample_quality"] = quality = evaluate_sample_quality(bundle, workdir)
    if quality:
      writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, collection="eval"
      )
      scalars = {f"eval/{k}": v for k, v in quality.items() if isinstance(v, float)}
      writer.write_scalars(_step_of(quality["samples"]), scalars)
      writer.flush()
      print(
        f"Sample quality ({config.sample.num_samples} samples in {quality['samples']}): "
        + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()),
        flush=True,
      )
  return results


def _step_of(sample_dir: str) -> int:
  """The checkpoint step of a sample directory, from its manifest."""
  manifest = json.loads(file_io.read_text(os.path.join(sample_dir, shards.MANIFEST_NAME)))
  return int(manifest["checkpoint_step"])


def _done_path(workdir: str) -> str:
  return os.path.join(workdir, "eval", "evaluated_steps.json")


def _read_done(workdir: str) -> list[int]:
  path = _done_path(workdir)
  return json.loads(file_io.read_text(path)) if file_io.exists(path) else []


def _write_done(workdir: str, steps: list[int]) -> None:
  if jax.process_index() == 0:
    file_io.write_atomically(_done_path(workdir), json.dumps(sorted(steps)).encode())


def checkpoint_steps(workdir: str) -> list[int]:
  """The completed checkpoint steps of a run, read without touching the directory."""
  try:
    with readers.open_checkpoints(workdir) as ckpt:
      return ckpt.all_steps()
  except readers.NoCheckpointError:
    return []


def watch(
  config: ml_collections.ConfigDict,
  workdir: str,
  poll_secs: float | None = None,
  timeout_secs: float | None = None,
) -> list[int]:
  """Evaluates each new checkpoint until the one of `training.num_train_steps` is done."""
  validate_config(config, mode="eval")
  workdir = file_io.absolute(workdir)
  poll_secs = config.eval.watch_poll_secs if poll_secs is None else poll_secs
  done = _read_done(workdir)
  start = time.monotonic()
  while config.training.num_train_steps not in done:
    pending = [s for s in checkpoint_steps(workdir) if s not in done]
    for step in pending:
      logging.info("Evaluating the checkpoint of step %d", step)
      _evaluate(ModelBundle.from_config(_at_step(config, step)), workdir)
      done.append(step)
      _write_done(workdir, done)
    if timeout_secs is not None and time.monotonic() - start > timeout_secs:
      break
    if not pending:
      time.sleep(poll_secs)
  return sorted(done)
