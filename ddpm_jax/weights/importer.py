"""Writing imported weights as a run's checkpoint: `<workdir>/checkpoints/<step>`, a full train
state whose params and EMA params are both the weights (fresh optimizer state), so every mode
uses it as is and `--mode=train` fine-tunes from it. An existing step is never overwritten."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import file_io
from ddpm_jax.checkpoints.checkpointer import Checkpointer
from ddpm_jax.weights import diffusers, tf1
from ddpm_jax.weights.matching import Params


def imported_train_state(params: Params, config: ml_collections.ConfigDict, step: int) -> Any:
  """A TrainState at `step` with `params` as params and EMA params, and a fresh optimizer (the
  structure training builds, so `--mode=train` resumes from it; the other modes read only the
  EMA params)."""
  from ddpm_jax.training import state as state_lib  # The optimizer: only to write a checkpoint.

  optimizer = state_lib.make_optimizer(config.optim)
  _, state_rng = jax.random.split(jax.random.PRNGKey(config.training.seed))
  # One compiled program: hundreds of eager per-leaf ops are several times slower on CPU.
  create = jax.jit(lambda p, rng: state_lib.create_train_state(p, optimizer, rng))
  return create(params, state_rng).replace(step=jnp.asarray(step, jnp.int32))


def _existing_steps(directory: str) -> list[int]:
  """The step directories in `directory` (Orbax names each completed save by its step)."""
  if not file_io.isdir(directory):
    return []
  names = (os.path.basename(path) for path in file_io.glob(directory, "*"))
  return sorted(int(name) for name in names if name.isdigit())


def check_step_free(workdir: str, step: int) -> None:
  """Raises FileExistsError when `<workdir>/checkpoints/<step>` exists (it is never replaced)."""
  directory = os.path.join(workdir, "checkpoints")
  if step in _existing_steps(directory):
    raise FileExistsError(
      f"{directory}/{step} already exists; nothing was written. Use another --workdir, pass "
      f"--step with a free step, or delete {directory}/{step} to convert again."
    )


def save_checkpoint(
  params: Params, config: ml_collections.ConfigDict, workdir: str, step: int
) -> str:
  """Writes `<workdir>/checkpoints/<step>` holding `imported_train_state`; returns its path."""
  check_step_free(workdir, step)
  directory = os.path.join(workdir, "checkpoints")
  keep = len(_existing_steps(directory)) + 1  # Never delete a checkpoint already there.
  state = imported_train_state(params, config, step)
  with Checkpointer(directory, keep=keep, every_steps=0, async_save=False) as ckpt:
    ckpt.save(step, state, force=True)
  return os.path.join(directory, str(step))


def convert(
  source: str,
  input_path: str,
  config: ml_collections.ConfigDict,
  workdir: str,
  step: int | None = None,
  use_ema: bool = True,
) -> str:
  """Imports `input_path` ('tf' or 'diffusers') into `<workdir>/checkpoints/<step>`; its path.

  `step` defaults to the TF checkpoint's step (else 0). Nothing is written when the weights do
  not fit the config, the file is malformed or the step exists.
  """
  if step is not None and step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  if source == "tf":
    prefix = tf1.resolve_tf_checkpoint(input_path)
    step = tf1.tf_checkpoint_step(prefix) if step is None else step
    check_step_free(workdir, step)
    params = tf1.from_tf_checkpoint(prefix, config, use_ema=use_ema)
  elif source == "diffusers":
    step = 0 if step is None else step
    check_step_free(workdir, step)
    state_dict = diffusers.load_diffusers_state_dict(input_path, config)
    params = diffusers.from_diffusers(state_dict, config)
  else:
    raise ValueError(f"source must be 'tf' or 'diffusers', got {source!r}")
  return save_checkpoint(params, config, workdir, step)
