"""The training program without its input, logs or files: the model bundle, the optimizer, the
initial state and the jitted data-parallel train step. It imports no TensorFlow, so benchmarks and
accelerator hosts without it can build and time exactly the step `--mode=train` runs."""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections

from ddpm_jax import model_bundle, parallel
from ddpm_jax.training import state as state_lib
from ddpm_jax.training import step as step_lib


def init_train_state(config, model, optimizer, rng: jax.Array) -> state_lib.TrainState:
  """A fresh state; the params are initialised from `rng` with a batch of one."""
  params_rng, state_rng = jax.random.split(rng)
  params = model_bundle.init_params(model, config, params_rng)
  return state_lib.create_train_state(params, optimizer, state_rng)


class TrainProgram:
  """The model bundle, optimizer and jitted train step of `config`, over all devices."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.bundle = model_bundle.ModelBundle.from_config(config)
    self.mesh, self.diffusion = self.bundle.mesh, self.bundle.diffusion
    self.model = self.bundle.model
    self.optimizer = state_lib.make_optimizer(config.optim)
    self.lr_schedule = state_lib.learning_rate_schedule(config.optim.lr, config.optim.warmup_steps)
    self.init_fn = jax.jit(
      functools.partial(
        init_train_state,
        config,
        self.model,
        self.optimizer,
        jax.random.PRNGKey(config.training.seed),
      ),
      out_shardings=parallel.replicated(self.mesh),
    )
    self.step_fn = step_lib.make_train_step(
      diffusion=self.diffusion,
      model=self.model,
      optimizer=self.optimizer,
      lr_schedule=self.lr_schedule,
      ema_decay=config.optim.ema_decay,
      global_batch_size=config.training.batch_size,
      label_dropout=config.training.label_dropout,
    )
    self._compiled_steps: dict[int, Any] = {}

  def train_step(self, steps: int):
    """The jitted step running `steps` optimizer steps per call (compiled once per value)."""
    if steps not in self._compiled_steps:
      self._compiled_steps[steps] = step_lib.shard_train_step(self.step_fn, self.mesh, steps)
    return self._compiled_steps[steps]
