"""Samplers over every device: each device runs the reverse chain on its share of the keys.

A `SamplerSpec` names what the chain does; `make_sample_fn` (fixed batches, `--mode=sample`) and
`make_sampler` (any number of samples, the training grids) run it sharded over the mesh. Sample i
draws all its noise from `sample_keys`' key i, so it depends on nothing but (seed, i).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ddpm_jax import parallel, solvers
from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.parallel import AXIS
from ddpm_jax.runtime import xla_flags


def sample_keys(rng: jax.Array, start: int, count: int) -> jax.Array:
  """Keys `[count, 2]` for global sample indices start..start+count-1: sample i depends only on
  (rng, i), never on the batch or device it is drawn on."""
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(start, start + count))


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """What the reverse chain does: `sampler` (one of `SAMPLERS`) over `num_steps` steps.

  `eta`: DDIM's noise (ancestral: 1). `clip_denoised`: clip each predicted x_0 to [-1, 1].
  DPM-Solver++ and Heun (`solvers`): `order` (dpm_solver: 1, 2 or 3), `spacing` ('linspace' |
  'trailing'), `karras` (Karras et al.'s noise levels), `lower_order_final` (dpm_solver); the
  other samplers keep these at their defaults, so that equal chains have equal specs.
  """

  sampler: str
  num_steps: int
  eta: float = 0.0
  clip_denoised: bool = True
  order: int = 2
  spacing: str = "linspace"
  karras: bool = False
  lower_order_final: bool = True

  @classmethod
  def from_config(cls, sample: ml_collections.ConfigDict, num_timesteps: int) -> SamplerSpec:
    """The spec of a (validated) `config.sample`. `ancestral` with `num_steps` >= T is Algorithm
    2 itself; with fewer steps it is the strided ancestral sampler, DDIM with eta = 1."""
    clip = bool(sample.clip_denoised)
    if sample.sampler == "ancestral":
      return cls("ancestral", min(sample.num_steps, num_timesteps), 1.0, clip)
    if sample.sampler == "ddim":
      return cls("ddim", sample.num_steps, float(sample.eta), clip)
    order = int(sample.order) if sample.sampler == "dpm_solver" else 2
    lower_order_final = bool(sample.lower_order_final) if sample.sampler == "dpm_solver" else True
    return cls(
      sample.sampler,
      sample.num_steps,
      0.0,
      clip,
      order,
      sample.spacing,
      bool(sample.karras_sigmas),
      lower_order_final,
    )

  @property
  def nfe(self) -> int:
    """Network evaluations per image (`solvers.num_function_evals`)."""
    return solvers.num_function_evals(self.sampler, self.num_steps)

  def solver_spec(self) -> solvers.SolverSpec:
    return solvers.SolverSpec(
      self.sampler,
      self.num_steps,
      self.order,
      self.spacing,
      self.karras,
      self.lower_order_final,
      self.clip_denoised,
    )

  def dirname(self, step: int, seed: int) -> str:
    """The output directory name, e.g. `samples_step800000_ddim_50steps_eta0_seed1` or
    `samples_step800000_dpm_solver2_linspace_20steps_nfe20_seed1`."""
    if self.sampler == "ancestral":
      kind = "ancestral"
    elif self.sampler == "ddim":
      kind = "ddim"
    else:
      order = str(self.order) if self.sampler == "dpm_solver" else ""
      final = "" if self.lower_order_final or self.sampler == "heun" else "_fullorder"
      kind = f"{self.sampler}{order}_{self.spacing}{'_karras' if self.karras else ''}{final}"
    eta = f"_eta{self.eta:g}" if self.sampler == "ddim" else ""
    nfe = f"_nfe{self.nfe}" if self.sampler in solvers.SOLVERS else ""
    clip = "" if self.clip_denoised else "_noclip"
    return f"samples_step{step}_{kind}_{self.num_steps}steps{eta}{nfe}_seed{seed}{clip}"


def _ancestral(diffusion: GaussianDiffusion, spec: SamplerSpec) -> Callable:
  if spec.num_steps < diffusion.num_timesteps:
    return _ddim(diffusion, spec)
  return lambda model_fn, shape, keys: diffusion.p_sample_loop(
    model_fn, shape, keys, spec.clip_denoised
  )


def _ddim(diffusion: GaussianDiffusion, spec: SamplerSpec) -> Callable:
  return lambda model_fn, shape, keys: diffusion.ddim_sample_loop(
    model_fn, shape, keys, num_steps=spec.num_steps, eta=spec.eta, clip_denoised=spec.clip_denoised
  )


def _ode_solver(diffusion: GaussianDiffusion, spec: SamplerSpec) -> Callable:
  return solvers.make_solver(diffusion, spec.solver_spec())


# sampler name -> (diffusion, spec) -> chain(model_fn, shape, keys [B, 2]) -> x_0 [B, H, W, C].
CHAINS: dict[str, Callable[[GaussianDiffusion, SamplerSpec], Callable]] = {
  "ancestral": _ancestral,
  "ddim": _ddim,
  "dpm_solver": _ode_solver,
  "heun": _ode_solver,
}
SAMPLERS = tuple(CHAINS)


def make_chain_fn(diffusion: GaussianDiffusion, spec: SamplerSpec) -> Callable:
  """`chain(model_fn, shape, keys [B, 2]) -> x0 [B, H, W, C]` for the sampler of `spec`."""
  return CHAINS[spec.sampler](diffusion, spec)


class ChainProgress:
  """Logs how far the reverse chains of a call have come, with an ETA (a host callback)."""

  def __init__(self, num_timesteps: int, num_reports: int = 10):
    self.num_timesteps = num_timesteps
    self.every = max(1, num_timesteps // num_reports)
    self.start("Sampling")

  def start(self, what: str) -> None:
    """Starts the clock of a call whose log lines begin with `what`."""
    self.what, self._start, self._last_t = what, time.monotonic(), None

  def __call__(self, t: np.ndarray) -> None:
    """Called by every device at each step t divisible by `every`; logs each t once."""
    t = int(t)
    if self._last_t is not None and t >= self._last_t:
      return
    self._last_t = t
    done, elapsed = self.num_timesteps - t, time.monotonic() - self._start
    logging.info(
      "%s: %d of %d reverse steps, %.0f s, ETA %.0f s.",
      self.what,
      done,
      self.num_timesteps,
      elapsed,
      elapsed * t / done,
    )


def _report_progress(progress: ChainProgress, t: jax.Array) -> None:
  jax.lax.cond(t % progress.every == 0, lambda: jax.debug.callback(progress, t), lambda: None)


def sample_labels(
  sample: ml_collections.ConfigDict, num_classes: int, start: int, count: int
) -> np.ndarray:
  """int32 `[count]`: the labels of samples start..start+count-1, a pure function of the index:
  `sample.class_label`, or (-1) i mod num_classes, balanced over the classes."""
  if sample.class_label >= 0:
    return np.full(count, sample.class_label, np.int32)
  return (np.arange(start, start + count) % num_classes).astype(np.int32)


def guided_model_fn(
  apply: Callable[[Any, Any, Any], Any],
  diffusion: GaussianDiffusion,
  y: jax.Array | None,
  null_class: int,
  guidance_scale: float,
) -> Callable:
  """`model_fn(x, t)` of a class-conditional network `apply(x, t, y)` with labels y `[B]`:
  classifier-free guidance (Ho & Salimans 2022), eps = (1 + w) eps(x, y) - w eps(x, null) for
  the mean part of the output (a learned variance stays the conditional one), the conditional and
  unconditional predictions as one forward pass of 2B. w = 0 is the conditional model alone."""
  if y is None or not guidance_scale:
    return lambda x, t: apply(x, t, y)

  def model_fn(x, t):
    both = apply(
      jnp.concatenate([x, x]),
      jnp.concatenate([t, t]),
      jnp.concatenate([y, jnp.full_like(y, null_class)]),
    )
    conditional, unconditional = jnp.split(both, 2)
    mean, variance = diffusion.split_output(conditional, x)
    mean_null, _ = diffusion.split_output(unconditional, x)
    mean = mean + guidance_scale * (mean - mean_null)
    return mean if variance is None else jnp.concatenate([mean, variance], axis=-1)

  return model_fn


def _sharded_chain(
  diffusion: GaussianDiffusion,
  model: nn.Module,
  mesh: Mesh,
  image_shape: tuple[int, int, int],
  chain: Callable,
  progress: ChainProgress | None = None,
  guidance_scale: float = 0.0,
) -> Callable[[Any, np.ndarray, np.ndarray | None], np.ndarray]:
  """`run(params, keys [N, 2], labels [N] or None) -> images [N, H, W, C]` (numpy, gathered on
  every process; N a multiple of the device count): each device runs `chain` on its share of the
  keys (and labels, guided by `guidance_scale`), calling `progress` at the steps it reports."""

  def per_device(params, keys, labels=None):
    def apply(x, t, y):
      if progress is not None:
        _report_progress(progress, t[0])
      return model.apply({"params": params}, x, t, train=False, y=y)

    model_fn = guided_model_fn(apply, diffusion, labels, model.num_classes, guidance_scale)
    return chain(model_fn, (keys.shape[0], *image_shape), keys)

  options = xla_flags.inference_compiler_options(parallel.platform(mesh))
  unlabelled = jax.jit(
    jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)),
    compiler_options=options,
  )
  labelled = jax.jit(
    jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(AXIS)),
    compiler_options=options,
  )

  def run(params, keys, labels=None):
    keys = parallel.shard_rows(keys, mesh)
    if labels is None:
      out = unlabelled(params, keys)
    else:
      out = labelled(params, keys, parallel.shard_rows(labels, mesh))
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  return run


def make_sampler(
  diffusion: GaussianDiffusion,
  model: nn.Module,
  mesh: Mesh,
  image_shape: tuple[int, int, int],
  clip_denoised: bool = True,
  progress: ChainProgress | None = None,
  guidance_scale: float = 0.0,
) -> Callable[..., np.ndarray]:
  """Returns `sample(params, keys [N, 2], labels [N] or None) -> images [N, H, W, C]` in
  [-1, 1] (float32 numpy): Algorithm 2 through all T steps, reporting to `progress` if given
  (start it before a call). Labels (class-conditional models; None: the null class) are guided
  by `guidance_scale`.

  The N chains are spread over the mesh; N need not divide the device count (keys are padded).
  """
  spec = SamplerSpec("ancestral", diffusion.num_timesteps, 1.0, clip_denoised)
  chain = make_chain_fn(diffusion, spec)
  run = _sharded_chain(diffusion, model, mesh, image_shape, chain, progress, guidance_scale)
  devices = mesh.devices.size

  def sample(params, keys, labels=None):
    size = parallel.round_up(keys.shape[0], devices)
    if labels is None:
      return parallel.pad_unpad(lambda k: run(params, k), size)(keys)
    return parallel.pad_unpad(lambda k, y: run(params, k, y), size)(keys, labels)

  return sample


def make_sample_fn(
  diffusion: GaussianDiffusion,
  model: nn.Module,
  mesh: Mesh,
  image_shape: tuple[int, int, int],
  spec: SamplerSpec,
  batch_size: int,
  guidance_scale: float = 0.0,
) -> Callable[..., np.ndarray]:
  """Returns `sample(params, keys [n, 2], labels [n] or None) -> images [n, H, W, C]` float32
  in [-1, 1] (numpy), labels guided by `guidance_scale` as in `make_sampler`.

  n <= batch_size; the keys are padded to batch_size rounded up to the device count, so every
  call runs the one compiled program. `params` must be replicated over `mesh`. Every process
  calls it with the same keys and gets all n images.
  """
  chain = make_chain_fn(diffusion, spec)
  run = _sharded_chain(diffusion, model, mesh, image_shape, chain, None, guidance_scale)
  padded = parallel.round_up(batch_size, mesh.devices.size)

  def sample(params, keys, labels=None):
    if not 0 < keys.shape[0] <= batch_size:
      raise ValueError(f"Got {keys.shape[0]} keys; this sampler takes 1 to {batch_size}.")
    if labels is None:
      return parallel.pad_unpad(lambda k: run(params, k), padded)(keys)
    return parallel.pad_unpad(lambda k, y: run(params, k, y), padded)(keys, labels)

  return sample
