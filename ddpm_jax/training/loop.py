"""The training loop: resumes from the latest checkpoint, trains, logs, samples, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job of `--mode=train`; rerunning it with the
same arguments resumes. Only process 0 writes logs, images and the config.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils

from ddpm_jax import file_io, image_grid, parallel
from ddpm_jax.checkpoints.checkpointer import Checkpointer
from ddpm_jax.config.validation import validate_config
from ddpm_jax.data import pipeline
from ddpm_jax.sampling import samplers
from ddpm_jax.training.preemption import PreemptionWatcher
from ddpm_jax.training.program import TrainProgram


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; no checkpoint was written after it."""


class NothingToTrainError(ValueError):
  """The workdir's checkpoint is beyond `training.num_train_steps`."""


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    file_io.write_atomically(os.path.join(workdir, "config.json"), text.encode())


class TrainLoop(TrainProgram):
  """The pieces of one training run, built once from the config: the program, its sampler and
  its image output."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    super().__init__(config)
    self.workdir = workdir
    self.progress = samplers.ChainProgress(self.diffusion.num_timesteps)
    self.sampler = samplers.make_sampler(
      self.diffusion,
      self.model,
      self.mesh,
      self.bundle.image_shape,
      clip_denoised=config.sample.clip_denoised,
      progress=self.progress,
      guidance_scale=config.sample.guidance_scale,
    )

  def sample_labels(self, num_images: int) -> np.ndarray | None:
    """The labels of samples 0..num_images-1 (`samplers.sample_labels`); None if unconditional."""
    if not self.model.num_classes:
      return None
    return samplers.sample_labels(self.config.sample, self.model.num_classes, 0, num_images)

  def sample_images(self, state, num_images: int, step: int) -> np.ndarray:
    """uint8 `[N, H, W, C]` EMA samples; sample i depends only on (sample.seed, i) and its
    label."""
    keys = samplers.sample_keys(jax.random.PRNGKey(self.config.sample.seed), 0, num_images)
    self.progress.start(f"Sampling {num_images} EMA images of step {step}")
    labels = self.sample_labels(num_images)
    return image_grid.to_uint8(self.sampler(state.ema_params, keys, labels))

  def grid_path(self, step: int) -> str:
    return os.path.join(self.workdir, "samples", f"step_{step:08d}.png")

  def sample_quality_path(self, step: int) -> str:
    return os.path.join(self.workdir, "samples", f"step_{step:08d}_sample_quality.json")

  def write_grid(self, images: np.ndarray, step: int, writer) -> str | None:
    """Writes the grid to TensorBoard and `samples/step_<N>.png` (small images upscaled)."""
    if jax.process_index() != 0:
      return None
    grid = image_grid.make_grid(images)
    scale = max(1, 64 // images.shape[1])
    path = self.grid_path(step)
    image_grid.save_png(path, grid.repeat(scale, axis=0).repeat(scale, axis=1))
    writer.write_images(step, {"ema_samples": grid[None]})
    logging.info("Wrote EMA samples of step %d to %s", step, path)
    return path


def report_sample_quality(
  loop: TrainLoop, images: np.ndarray, step: int, writer
) -> dict[str, float]:
  """FID (and IS) of uint8 EMA samples `[N, H, W, C]` against the real data (process 0), to
  TensorBoard, stdout and `samples/step_<N>_sample_quality.json`."""
  from ddpm_jax.evaluation import sample_quality  # The feature networks are only needed here.

  config = loop.config
  result = sample_quality.evaluate_samples(config, images, loop.sample_labels(len(images)))
  writer.write_scalars(step, {f"sample_quality/{k}": v for k, v in result.items()})
  file_io.write_atomically(loop.sample_quality_path(step), json.dumps(result, indent=2).encode())
  summary = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
  print(
    f"Sample quality of {len(images)} EMA samples at step {step} ({config.data.dataset}, "
    f"against its {config.eval.fid_split} split): {summary}",
    flush=True,
  )
  return result


def _data_iterator(config, start_step: int):
  """Batches of images `[b, H, W, C]`, or (images, labels `[b]`) for a class-conditional model."""
  return pipeline.create_train_dataset(
    config,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    start_step=start_step,
    labels=config.model.num_classes > 0,
  )


def _next_batch(data_iter, loop: TrainLoop, steps: int) -> Any:
  """The next `steps` local batches as global arrays (stacked `[K, ...]` for K > 1)."""
  local = [next(data_iter) for _ in range(steps)]
  local = jax.tree.map(lambda *b: np.stack(b), *local) if steps > 1 else local[0]
  return jax.tree.map(lambda x: parallel.global_batch(x, loop.mesh, steps), local)


class MetricsBuffer:
  """Device-side metrics of the calls since the last flush, fetched only when needed."""

  def __init__(self):
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, metrics))

  def flush(self) -> dict[str, float] | None:
    """Fetches the pending metrics; raises NonFiniteLossError at the first non-finite loss."""
    if not self._pending:
      return None
    fetched = jax.device_get([m for _, m in self._pending])
    steps = [s for s, _ in self._pending]
    self._pending = []
    for step, m in zip(steps, fetched, strict=True):
      if not m["finite"]:
        raise NonFiniteLossError(
          f"The loss became {float(m['loss'])} by step {step}. Training stopped; no checkpoint "
          "was written after it, so the latest checkpoint in the workdir is intact. Lower "
          "optim.lr, check optim.grad_clip, or try model.dtype=float32, then rerun to resume."
        )
    summary = {k: float(v) for k, v in fetched[-1].items() if k != "finite"}
    summary["loss"] = float(np.mean([m["loss"] for m in fetched]))
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the state.

  Every user error (a bad config, a workdir that cannot be written, a checkpoint beyond
  `training.num_train_steps`) is raised before anything is written.
  """
  workdir = file_io.absolute(workdir)
  validate_config(
    config, mode="train", device_count=jax.device_count(), process_count=jax.process_count()
  )
  file_io.make_writable_dir(workdir, "--workdir")
  loop = TrainLoop(config, workdir)
  training = config.training
  with Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=training.keep_checkpoints,
    every_steps=training.checkpoint_every_steps,
    every_secs=training.checkpoint_every_secs,
    default_sharding=parallel.replicated(loop.mesh),
  ) as ckpt:
    _check_not_beyond(ckpt, training.num_train_steps)
    pipeline.prepare_embedded_dataset(config)
    pipeline.check_labels(config)  # A class-conditional model needs a dataset with its labels.
    write_config(config, workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    state, resumed = ckpt.restore_or_init(loop.init_fn)
    start_step = int(state.step)
    if resumed:
      logging.info("Resumed from the checkpoint of step %d in %s", start_step, ckpt.directory)
    else:
      parameter_overview.log_parameter_overview(state.params, jax_logging_process=0)
    writer.write_hparams(
      {
        "num_params": parallel.param_count(state.params),
        "num_devices": jax.device_count(),
        "global_batch_size": training.batch_size,
      }
    )
    state = _run(loop, state, start_step, ckpt, writer)
  writer.flush()
  return state


def _check_not_beyond(ckpt: Checkpointer, num_train_steps: int) -> None:
  latest = ckpt.latest_step()
  if latest is not None and latest > num_train_steps:
    raise NothingToTrainError(
      f"The latest checkpoint in {ckpt.directory} is of step {latest}, beyond "
      f"training.num_train_steps={num_train_steps}: nothing to train. Pass "
      f"--config.training.num_train_steps={latest} or more to resume it, or use a fresh "
      "--workdir."
    )


def _missing_final_outputs(loop: TrainLoop, step: int) -> bool:
  """Whether the samples (grid, FID) that training ends with are not on disk for `step`."""
  training = loop.config.training
  paths = [loop.grid_path(step)] if training.sample_every else []
  paths += [loop.sample_quality_path(step)] if training.fid_num_samples else []
  missing = any(not file_io.exists(p) for p in paths)
  if jax.process_count() > 1:  # Process 0 writes them: its view decides for all.
    missing = bool(multihost_utils.broadcast_one_to_all(np.bool_(missing)))
  return missing


def _sample(loop: TrainLoop, state, step: int, writer, ckpt, preemption) -> str | None:
  """The EMA sample grid (if `training.sample_every`), and at the last step the sample quality
  of `training.fid_num_samples` samples (the grid's are the first of them).

  When the checkpoint of `step` is on disk, a SIGTERM meanwhile ends the process at once.
  """
  training = loop.config.training
  last = step == training.num_train_steps
  n_grid = training.num_sample_images if training.sample_every else 0
  n_fid = training.fid_num_samples if last else 0
  if not max(n_grid, n_fid):
    return None
  ckpt.wait_until_finished()
  # With several processes this takes SIGTERM from JAX for good: only once training is over.
  if step in ckpt.all_steps() and (last or jax.process_count() == 1):
    what = " and their FID" if n_fid else ""
    preemption.exit_on_sigterm(f"the EMA samples{what} of step {step}", writer.flush)
  try:
    images = loop.sample_images(state, max(n_grid, n_fid), step)
    path = loop.write_grid(images[:n_grid], step, writer) if n_grid else None
    if n_fid and jax.process_index() == 0:
      report_sample_quality(loop, images, step, writer)
  finally:
    preemption.resume_saving()
  return path


def _run(loop: TrainLoop, state, start_step: int, ckpt, writer):
  """Steps from `start_step` to `training.num_train_steps`, or until preempted."""
  config, training = loop.config, loop.config.training
  num_steps = training.num_train_steps
  data_iter = _data_iterator(config, start_step) if start_step < num_steps else None
  # Logs progress and ETA; the scalars (steps/s, images/s) are written at log steps below.
  report = periodic_actions.ReportProgress(num_train_steps=num_steps)
  preemption = PreemptionWatcher(ckpt.reached_preemption)
  metrics = MetricsBuffer()
  step, k = start_step, training.steps_per_call
  last_log_time, last_log_step = time.time(), start_step
  sample_path = None
  try:
    if step == num_steps:
      print(f"Already trained to step {step}.", flush=True)
      if _missing_final_outputs(loop, step):
        sample_path = _sample(loop, state, step, writer, ckpt, preemption)
    while step < num_steps:
      n = k if step % k == 0 and step + k <= num_steps else 1
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, m = loop.train_step(n)(state, _next_batch(data_iter, loop, n))
      step += n
      metrics.add(step, m)
      report(step)
      log_step = step % training.log_every == 0 or step == num_steps
      if log_step:
        summary = metrics.flush()
        now = time.time()
        rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
        summary |= {"steps_per_sec": rate, "images_per_sec": rate * training.batch_size}
        writer.write_scalars(step, summary)
        last_log_time, last_log_step = now, step
      stopping = preemption.reached(step)
      # The time-based save is decided at log steps (a collective with several processes).
      every = training.checkpoint_every_steps
      due = log_step or (every and step % every == 0)
      if stopping or step == num_steps or (due and ckpt.should_save(step)):
        metrics.flush()  # Never checkpoint a state that followed a non-finite loss.
        ckpt.save(step, state, force=True)
      if step == num_steps or (training.sample_every and step % training.sample_every == 0):
        sample_path = _sample(loop, state, step, writer, ckpt, preemption) or sample_path
      if stopping:
        logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
        break
  finally:
    preemption.close()
  ckpt.wait_until_finished()
  if sample_path:
    print(f"Trained to step {step}. EMA samples: {sample_path}", flush=True)
  return state
