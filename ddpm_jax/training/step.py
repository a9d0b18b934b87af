"""The data-parallel train step: a per-device program mapped over every device with shard_map.

The per-device program is what `jax.pmap` would run: it sees a `[B_local, H, W, C]` slice of the
batch and the replicated state, and communicates over the mesh axis `data`. Under `shard_map` with
`check_vma=True`, the gradient of replicated params is already summed over devices (the transpose
of the implicit broadcast), so each device's loss is its share `sum(losses) / B_global` and no
extra `pmean` is applied: the result is the gradient of the global mean loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.parallel import AXIS
from ddpm_jax.training.state import TrainState, ema_update

StepFn = Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def example_keys(rng: jax.Array, batch: int) -> jax.Array:
  """One key per example `[B_local]`, from the example's index in the global batch, so that the
  draws do not depend on how the batch is laid out over devices and processes."""
  index = jax.lax.axis_index(AXIS) * batch + jnp.arange(batch)
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, index)


def sample_t_and_noise(
  rng: jax.Array, x_start: jax.Array, num_timesteps: int
) -> tuple[jax.Array, jax.Array]:
  """t ~ Uniform{0..T-1} `[B_local]` and eps ~ N(0, I) like x_start, per global example."""
  t_rng, noise_rng = jax.random.split(rng)
  batch = x_start.shape[0]
  t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps, jnp.int32))(
    example_keys(t_rng, batch)
  )
  noise = jax.vmap(lambda k: jax.random.normal(k, x_start.shape[1:], x_start.dtype))(
    example_keys(noise_rng, batch)
  )
  return t, noise


def drop_labels(rng: jax.Array, y: jax.Array, label_dropout: float, null_class: int) -> jax.Array:
  """y `[B_local]` with each label replaced by `null_class` with probability `label_dropout`,
  drawn per global example index (classifier-free guidance's joint training)."""
  u = jax.vmap(lambda k: jax.random.uniform(k, ()))(example_keys(rng, y.shape[0]))
  return jnp.where(u < label_dropout, null_class, y)


def make_train_step(
  *,
  diffusion: GaussianDiffusion,
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
  ema_decay: float,
  global_batch_size: int,
  label_dropout: float = 0.0,
) -> StepFn:
  """Returns the per-device step `(state, batch) -> (state, metrics)`: batch x_start
  `[B_local, H, W, C]`, or (x_start, labels `[B_local]`) for a class-conditional model, whose
  labels are dropped to the null class (`model.num_classes`) with probability `label_dropout`."""

  def step_fn(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    x_start, y = batch if isinstance(batch, tuple) else (batch, None)
    rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    t, noise = sample_t_and_noise(rng, x_start, diffusion.num_timesteps)
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(AXIS))
    if y is not None:  # Its own key: an unconditional run draws exactly what it drew before.
      y = drop_labels(jax.random.fold_in(rng, 2), y, label_dropout, model.num_classes)

    def loss_fn(params):
      def model_fn(x, t):
        return model.apply({"params": params}, x, t, train=True, y=y, rngs={"dropout": dropout_rng})

      losses = diffusion.training_losses(model_fn, x_start, t, noise)
      return jnp.sum(losses.astype(jnp.float32)) / global_batch_size

    local_loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      ema_params=ema_update(state.ema_params, params, ema_decay),
      opt_state=opt_state,
    )
    metrics = dict(
      loss=jax.lax.psum(local_loss, AXIS),
      grad_norm=optax.tree.norm(grads),
      param_norm=optax.tree.norm(params),
      lr=jnp.asarray(lr_schedule(state.step), jnp.float32),
    )
    return new_state, metrics

  return step_fn


def scan_steps(step_fn: StepFn) -> StepFn:
  """Runs `step_fn` over a leading axis of batches `[K, B_local, ...]` in one call.

  Metrics are those of the last step, with the loss averaged over the K steps and `finite`
  false if any of the K losses was not finite.
  """

  def multi_step(state, batches):
    state, metrics = jax.lax.scan(step_fn, state, batches)
    last = jax.tree.map(lambda m: m[-1], metrics)
    last["loss"] = jnp.mean(metrics["loss"])
    last["finite"] = jnp.all(jnp.isfinite(metrics["loss"]))
    return state, last

  return multi_step


def shard_train_step(step_fn: StepFn, mesh: Mesh, steps_per_call: int = 1) -> Callable:
  """Maps the per-device step over the mesh and jits it, donating the state.

  The returned function takes the replicated state and a global batch `[B, H, W, C]` sharded
  over `data` (or `[K, B, H, W, C]` with K = steps_per_call > 1).
  """
  if steps_per_call > 1:
    fn, batch_spec = scan_steps(step_fn), P(None, AXIS)
  else:
    fn, batch_spec = _with_finite(step_fn), P(AXIS)
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(), batch_spec), out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=0)


def _with_finite(step_fn: StepFn) -> StepFn:
  def wrapped(state, batch):
    state, metrics = step_fn(state, batch)
    return state, metrics | {"finite": jnp.isfinite(metrics["loss"])}

  return wrapped
