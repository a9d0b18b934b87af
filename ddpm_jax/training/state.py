"""The immutable train state and the optimizer of the paper (Adam, warm-up, clipping, EMA)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes; a checkpoint holds exactly this pytree.

  Attributes:
    step: int32 scalar, the number of optimizer updates done.
    params: the U-Net parameters, float32 (the `param_dtype`).
    ema_params: exponential moving average of `params`, used for sampling and evaluation.
    opt_state: the optax state of `make_optimizer`.
    rng: the base PRNG key; each step folds in the step and the device index.
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


def learning_rate_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
  """lr * min(1, step / warmup_steps), the original's linear warm-up (0 at step 0).

  Not `optax.linear_schedule(0, lr, warmup_steps)`: it computes lr - lr (1 - step / warmup) in
  float32, which cancels to a relative error of ~1e-4 on the first steps of a long warm-up.
  """
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return lambda count: lr * jnp.minimum(1.0, count / warmup_steps)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping then Adam with the warm-up schedule.

  The original clipped each TPU core's gradient before the cross-core mean; we clip the global
  mean gradient, the usual modern choice (identical on one device).
  """
  # The chain keeps its shape with clipping off, so a run can resume after changing grad_clip.
  clip = optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity()
  adam = optax.adam(
    learning_rate_schedule(optim.lr, optim.warmup_steps),
    b1=optim.beta1,
    b2=optim.beta2,
    eps=optim.eps,
  )
  return optax.chain(clip, adam)


def create_train_state(
  params: Any, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
  """A fresh state at step 0. `ema_params` is a copy, never an alias of `params`: donating a
  state that holds one buffer twice crashes on a multi-device mesh."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),
    opt_state=optimizer.init(params),
    rng=rng,
  )


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
  return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
