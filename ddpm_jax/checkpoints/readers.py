"""Reading a training run's checkpoints from another job (sampling, evaluation, figures).

Readers open `<workdir>/checkpoints` read-only, so a job started next to a running training job
never deletes its save in flight, and never move or change a checkpoint: one that is corrupt is
reported (`CorruptCheckpointError`, naming the other steps to use), not set aside.
"""

from __future__ import annotations

import os
from typing import Any

from ddpm_jax import file_io
from ddpm_jax.checkpoints import checkpointer as checkpointing


class NoCheckpointError(FileNotFoundError):
  """The workdir has no checkpoint (of the requested step) to load."""


CorruptCheckpointError = checkpointing.CorruptCheckpointError


def open_checkpoints(workdir: str) -> checkpointing.Checkpointer:
  """A read-only Checkpointer of the run; NoCheckpointError (creating nothing) if it is empty."""
  workdir = file_io.absolute(workdir)
  directory = os.path.join(workdir, "checkpoints")
  advice = (
    f"Train first (--mode=train with the same --config and --workdir={workdir}), or point "
    "--workdir at a run that has checkpoints."
  )
  if not file_io.isdir(directory):
    raise NoCheckpointError(f"No checkpoint to load: {directory} does not exist. {advice}")
  ckpt = checkpointing.Checkpointer(
    directory, keep=1, every_steps=0, async_save=False, read_only=True
  )
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
      "--config.sample.checkpoint_step to one of them, or to -1 for the latest."
    )
  return requested


def restore_ema_params(ckpt: checkpointing.Checkpointer, abstract_params: Any, step: int) -> Any:
  """The EMA params of checkpoint `step`, laid out as `abstract_params` (their shapes, dtypes and
  shardings); nothing else of the train state (the optimizer's) is read.

  Raises CorruptCheckpointError (changing nothing on disk) when that checkpoint is damaged.
  """
  return restore_params(ckpt, abstract_params, step, "ema_params")


def _other_steps_advice(ckpt: checkpointing.Checkpointer, bad_step: int) -> str:
  """What to do instead of reading the corrupt checkpoint `bad_step`, in one line."""
  others = [s for s in ckpt.all_steps() if s != bad_step]
  retrain = (
    "rerunning the training (--mode=train) moves it aside, unchanged, and resumes from "
    "the newest intact step"
  )
  if not others:
    return (
      f"Nothing was changed on disk. It is the only checkpoint in {ckpt.directory}; "
      f"{retrain} (here: from scratch)."
    )
  older = [s for s in others if s < bad_step]
  choice = f"={older[-1]} (the newest older one)" if older else " to one of them"
  return (
    f"Nothing was changed on disk. Other steps available in {ckpt.directory}: {others}; "
    f"set --config.sample.checkpoint_step{choice}, or {retrain}."
  )


def load_ema_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """(EMA params, step) of checkpoint `step` (None or negative: the latest) in
  `<workdir>/checkpoints`, laid out as `abstract_params`."""
  with open_checkpoints(workdir) as ckpt:
    step = select_step(ckpt, step)
    return restore_ema_params(ckpt, abstract_params, step), step


PARAM_FIELDS = ("ema_params", "params")


def restore_params(
  ckpt: checkpointing.Checkpointer, abstract_params: Any, step: int, which: str = "ema_params"
) -> Any:
  """The `which` params ('ema_params' or the raw 'params') of checkpoint `step`, laid out as
  `abstract_params`; nothing else of the train state is read.

  Raises CorruptCheckpointError (changing nothing on disk, naming the other steps to use) when
  that checkpoint is damaged.
  """
  if which not in PARAM_FIELDS:
    raise ValueError(f"which must be one of {PARAM_FIELDS}, got {which!r}")
  try:
    return ckpt.restore_part({which: abstract_params}, step)[which]
  except CorruptCheckpointError as e:
    raise CorruptCheckpointError(
      f"{e} {_other_steps_advice(ckpt, e.step)}", step=e.step, reason=e.reason
    ) from e
