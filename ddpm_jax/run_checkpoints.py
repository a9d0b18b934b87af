"""Reading a training run's checkpoints from another job (sampling, evaluation, figures).

Readers open `<workdir>/checkpoints` read-only, so a job started next to a running training job
never deletes its save in flight, and never move or change a checkpoint: one that is corrupt is
reported (`CorruptCheckpointError`, naming the other steps to use), not set aside.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

from ddpm_jax import checkpointing
from ddpm_jax import train_step as train_step_lib


class NoCheckpointError(FileNotFoundError):
  """The workdir has no checkpoint (of the requested step) to load."""


CorruptCheckpointError = checkpointing.CorruptCheckpointError


def open_checkpoints(workdir: str, mesh) -> checkpointing.Checkpointer:
  """A read-only Checkpointer of the run; NoCheckpointError (creating nothing) if it is empty."""
  directory = os.path.join(workdir, "checkpoints")
  advice = (f"Train first (--mode=train with the same --config and --workdir={workdir}), or point "
            "--workdir at a run that has checkpoints.")
  if not tf.io.gfile.isdir(directory):
    raise NoCheckpointError(f"No checkpoint to load: {directory} does not exist. {advice}")
  ckpt = checkpointing.Checkpointer(
      directory, keep=1, every_steps=0, async_save=False, read_only=True,
      default_sharding=train_step_lib.replicated(mesh))
  if not ckpt.all_steps():
    ckpt.close()
    raise NoCheckpointError(f"No checkpoint to load in {directory}. {advice}")
  return ckpt


def select_step(ckpt: checkpointing.Checkpointer, requested: int | None) -> int:
  """`requested` if it is on disk, or the latest step when it is None or negative."""
  steps = ckpt.all_steps()
  if requested is None or requested < 0:
    return steps[-1]
  if requested not in steps:
    raise NoCheckpointError(
        f"No checkpoint of step {requested} in {ckpt.directory}; available steps: {steps}. Set "
        "--config.sample.checkpoint_step to one of them, or to -1 for the latest.")
  return requested


def restore_ema_params(ckpt: checkpointing.Checkpointer, loop, step: int) -> Any:
  """The EMA params of checkpoint `step`, replicated over `loop.mesh` (a `train.TrainLoop`).

  Raises CorruptCheckpointError (changing nothing on disk) when that checkpoint is damaged.
  """
  abstract = checkpointing.abstract_state(loop.init_fn, train_step_lib.replicated(loop.mesh))
  try:
    return ckpt.restore(abstract, step).ema_params
  except CorruptCheckpointError as e:
    raise CorruptCheckpointError(
        f"{e} {_other_steps_advice(ckpt, e.step)}", step=e.step, reason=e.reason) from e


def _other_steps_advice(ckpt: checkpointing.Checkpointer, bad_step: int) -> str:
  """What to do instead of reading the corrupt checkpoint `bad_step`, in one line."""
  others = [s for s in ckpt.all_steps() if s != bad_step]
  retrain = ("rerunning the training (--mode=train) moves it aside, unchanged, and resumes from "
             "the newest intact step")
  if not others:
    return (f"Nothing was changed on disk. It is the only checkpoint in {ckpt.directory}; "
            f"{retrain} (here: from scratch).")
  older = [s for s in others if s < bad_step]
  choice = f"={older[-1]} (the newest older one)" if older else " to one of them"
  return (f"Nothing was changed on disk. Other steps available in {ckpt.directory}: {others}; "
          f"set --config.sample.checkpoint_step{choice}, or {retrain}.")


def load_ema_params(loop, step: int | None = None) -> tuple[Any, int]:
  """(EMA params, step) of checkpoint `step` (None or negative: the latest) of `loop.workdir`."""
  with open_checkpoints(loop.workdir, loop.mesh) as ckpt:
    step = select_step(ckpt, step)
    return restore_ema_params(ckpt, loop, step), step
