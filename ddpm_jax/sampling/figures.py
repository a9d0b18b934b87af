"""The paper's sampling figures (Ho et al. 2020, Figs. 6-9) as uint8 image tables and PNGs.

Each figure function returns a table uint8 `[rows, cols, H, W, C]`; `tile` lays it out as one
image (2-pixel white padding, `image_grid.make_grid`). The parameters are jit arguments, not
constants, and the start step t is traced, so each figure compiles once whatever its rows.
Timesteps are 0-based; the paper's t in {1000, 750, 500, 250} becomes round(k T) - 1 for
k in {1, 0.75, 0.5, 0.25} (`scaled_timestep`), e.g. 999, 749, 499, 249 for T = 1000.

`write_figures(config, workdir)` writes all four under `<workdir>/figures/step_<step>/`:
  progressive_generation.png  Fig. 6: rows = samples; columns = predicted x_0 at t = 950, 900,
                              ..., 0 (T // 20 apart), then the sample.
  shared_latents.png          Fig. 7: one row per t in (999, 749, 499, 249): x_0, the frozen
                              x_t ~ q(x_t | x_0), then reverse chains from x_t with other noise.
  interpolation.png           Fig. 8: one row per image pair at t = 499: source a, lambda = 0
                              (reconstruction of a), 0.1, ..., 0.9, 1 (reconstruction of b),
                              source b; the same noise for every lambda.
  coarse_to_fine.png          Fig. 9: the first pair, as in Fig. 8, at t = 0, 249, 499, 749, 999.
and, beyond the paper:
  samplers.png                the first samples from the same x_T, one row per sampler
                              (`comparison_specs`): the paper's 1000-step chain, then the ODE
                              samplers (DDIM with eta 0, DPM-Solver++, Heun) at about
                              `sample.num_steps` network evaluations (20 for the ancestral
                              default), whose samples all approach the probability-flow ODE's.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import image_grid, model_bundle
from ddpm_jax.config.validation import validate_config
from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.sampling.samplers import SamplerSpec, make_chain_fn, sample_keys

SHARED_LATENT_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
INTERPOLATION_FRACTION = 0.5
COARSE_TO_FINE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
NUM_LAMBDAS = 11  # 0, 0.1, ..., 1.


def scaled_timestep(fraction: float, num_timesteps: int) -> int:
  """The 0-based step of the paper's t = fraction * T: round(fraction T) - 1, at least 0."""
  return max(0, min(num_timesteps - 1, round(fraction * num_timesteps) - 1))


def tile(table: np.ndarray, padding: int = 2) -> np.ndarray:
  """uint8 `[R, K, H, W, C]` -> one image `[R (H + p) + p, K (W + p) + p, C]`, row by row."""
  rows, cols, h, w, c = table.shape
  return image_grid.make_grid(table.reshape(rows * cols, h, w, c), num_cols=cols, padding=padding)


def _model_fn(model: nn.Module, params: Any):
  return lambda x, t: model.apply({"params": params}, x, t, train=False)


# -- Fig. 6: progressive generation. -----------------------------------------------------------


@functools.partial(
  jax.jit, static_argnames=("diffusion", "model", "image_shape", "freq", "clip_denoised")
)
def _progressive(params, keys, *, diffusion, model, image_shape, freq, clip_denoised):
  final, preds = diffusion.p_sample_loop_progressive(
    _model_fn(model, params),
    (keys.shape[0], *image_shape),
    keys,
    clip_denoised,
    include_xstartpred_freq=freq,
  )
  # preds slot k holds t = k * freq; show them in reverse time, then the sample.
  return jnp.concatenate([jnp.flip(preds, axis=1), final[:, None]], axis=1)


def progressive_generation(
  diffusion: GaussianDiffusion,
  model: nn.Module,
  params: Any,
  keys: jax.Array,
  image_shape: tuple[int, int, int],
  *,
  num_snapshots: int = 20,
  clip_denoised: bool = True,
) -> np.ndarray:
  """Fig. 6. keys `[N, 2]` (one per sample, as `samplers.sample_keys`) -> uint8 `[N, K + 1, H,
  W, C]`: the x_0 predicted at t = (K - 1) f, ..., f, 0 with f = T // num_snapshots and
  K = T // f, then the final sample (equal to `p_sample_loop` with the same keys)."""
  freq = max(1, diffusion.num_timesteps // num_snapshots)
  table = _progressive(
    params,
    keys,
    diffusion=diffusion,
    model=model,
    image_shape=tuple(image_shape),
    freq=freq,
    clip_denoised=clip_denoised,
  )
  return image_grid.to_uint8(table)


# -- Fig. 7: shared latents. -------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("diffusion", "model", "num_chains", "clip_denoised"))
def _shared_latent_row(params, x_start, t, rng, *, diffusion, model, num_chains, clip_denoised):
  x_start = x_start[None]
  noise = jax.random.normal(jax.random.fold_in(rng, 0), x_start.shape, x_start.dtype)
  x_t = diffusion.q_sample(x_start, jnp.full((1,), t, jnp.int32), noise)
  keys = sample_keys(jax.random.fold_in(rng, 1), 0, num_chains)
  chains = diffusion.p_sample_loop_from(
    _model_fn(model, params), jnp.repeat(x_t, num_chains, axis=0), t, keys, clip_denoised
  )
  return jnp.concatenate([x_start, x_t, chains])


def shared_latents(
  diffusion: GaussianDiffusion,
  model: nn.Module,
  params: Any,
  x_start: np.ndarray,
  rng: jax.Array,
  *,
  timesteps: Sequence[int],
  num_chains: int = 6,
  clip_denoised: bool = True,
) -> np.ndarray:
  """Fig. 7. x_start `[H, W, C]` in [-1, 1] -> uint8 `[len(timesteps), 2 + num_chains, H, W,
  C]`: per t, x_0, one x_t ~ q(x_t | x_0) (same noise for every t) and num_chains samples of
  p(x_0 | x_t), each chain with its own noise (the same chain keys in every row)."""
  rows = [
    _shared_latent_row(
      params,
      jnp.asarray(x_start),
      jnp.int32(t),
      rng,
      diffusion=diffusion,
      model=model,
      num_chains=num_chains,
      clip_denoised=clip_denoised,
    )
    for t in timesteps
  ]
  return image_grid.to_uint8(jnp.stack(rows))


# -- Figs. 8 and 9: interpolation. -------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("diffusion", "model", "num_lambdas", "clip_denoised"))
def _interpolation_row(params, x_a, x_b, t, rng, *, diffusion, model, num_lambdas, clip_denoised):
  lams = jnp.linspace(0.0, 1.0, num_lambdas)
  # One key repeated per lambda: every lambda diffuses with the same noise, denoises with the same.
  keys = jnp.broadcast_to(rng, (num_lambdas, *rng.shape))
  repeat = lambda x: jnp.broadcast_to(x, (num_lambdas, *x.shape))
  mixed = diffusion.interpolate(
    _model_fn(model, params), repeat(x_a), repeat(x_b), lams, t, keys, clip_denoised
  )
  return jnp.concatenate([x_a[None], mixed, x_b[None]])


def interpolation(
  diffusion: GaussianDiffusion,
  model: nn.Module,
  params: Any,
  x_a: np.ndarray,
  x_b: np.ndarray,
  rng: jax.Array,
  *,
  timesteps: Sequence[int],
  num_lambdas: int = NUM_LAMBDAS,
  clip_denoised: bool = True,
) -> np.ndarray:
  """Figs. 8 and 9. Image pairs x_a, x_b `[P, H, W, C]` in [-1, 1] and one step per pair
  (`timesteps` of length P; or one pair `[H, W, C]` and any number of steps, Fig. 9) -> uint8
  `[rows, num_lambdas + 2, H, W, C]`: source a, lambda = 0 (the reconstruction of a), ...,
  lambda = 1 (the reconstruction of b), source b. `rng` is one raw key `[2]`; row r uses
  fold_in(rng, r), the same for all its lambdas."""
  x_a, x_b = np.asarray(x_a), np.asarray(x_b)
  if x_a.ndim == 3:
    x_a, x_b = (np.repeat(x[None], len(timesteps), axis=0) for x in (x_a, x_b))
  if len(x_a) != len(timesteps) or x_a.shape != x_b.shape:
    raise ValueError(f"Got pairs {x_a.shape} and {x_b.shape} for {len(timesteps)} timesteps.")
  rows = [
    _interpolation_row(
      params,
      jnp.asarray(a),
      jnp.asarray(b),
      jnp.int32(t),
      jax.random.fold_in(rng, r),
      diffusion=diffusion,
      model=model,
      num_lambdas=num_lambdas,
      clip_denoised=clip_denoised,
    )
    for r, (a, b, t) in enumerate(zip(x_a, x_b, timesteps, strict=True))
  ]
  return image_grid.to_uint8(jnp.stack(rows))


# -- Beyond the paper: samplers side by side. ----------------------------------------------------


@functools.partial(jax.jit, static_argnames=("diffusion", "model", "image_shape", "spec"))
def _chain(params, keys, *, diffusion, model, image_shape, spec):
  chain = make_chain_fn(diffusion, spec)
  return chain(_model_fn(model, params), (keys.shape[0], *image_shape), keys)


def comparison_specs(num_timesteps: int, nfe: int, clip_denoised: bool = True) -> list[SamplerSpec]:
  """The rows of `sampler_comparison`: Algorithm 2 over all T steps, then DDIM (eta 0),
  DPM-Solver++ (orders 2 and 3) and Heun at about `nfe` network evaluations."""
  nfe = min(nfe, num_timesteps - 1)
  return [
    SamplerSpec("ancestral", num_timesteps, 1.0, clip_denoised),
    SamplerSpec("ddim", nfe, 0.0, clip_denoised),
    SamplerSpec("dpm_solver", nfe, 0.0, clip_denoised, order=2),
    SamplerSpec("dpm_solver", nfe, 0.0, clip_denoised, order=3),
    SamplerSpec("heun", (nfe + 1) // 2, 0.0, clip_denoised),
  ]


def sampler_comparison(
  diffusion: GaussianDiffusion,
  model: nn.Module,
  params: Any,
  keys: jax.Array,
  image_shape: tuple[int, int, int],
  specs: Sequence[SamplerSpec],
) -> np.ndarray:
  """keys `[N, 2]` -> uint8 `[len(specs), N, H, W, C]`: row r holds the N samples of `specs[r]`,
  every row from the same x_T (the keys' `diffusion.draw_x_T`)."""
  rows = [
    _chain(
      params, keys, diffusion=diffusion, model=model, image_shape=tuple(image_shape), spec=spec
    )
    for spec in specs
  ]
  return image_grid.to_uint8(jnp.stack(rows))


# -- All of them. ---------------------------------------------------------------------------------


def eval_images(config: ml_collections.ConfigDict, num_images: int) -> np.ndarray:
  """The first `num_images` of the eval split (`data.eval_split`), float32 `[n, H, W, C]`."""
  from ddpm_jax.data import pipeline  # TensorFlow, only for the real images.

  batches = pipeline.create_eval_dataset(
    config,
    process_index=0,
    process_count=1,
    batch_size_per_process=num_images,
    num_examples=num_images,
  )
  images, mask = next(batches)
  if mask.sum() < num_images:
    raise ValueError(
      f"The eval split {config.data.eval_split!r} of {config.data.dataset} has "
      f"only {int(mask.sum())} images; the figures need {num_images}."
    )
  return images[mask]


def figure_tables(
  diffusion: GaussianDiffusion,
  model: nn.Module,
  params: Any,
  source_images: np.ndarray,
  *,
  seed: int,
  num_samples: int = 8,
  num_chains: int = 6,
  clip_denoised: bool = True,
  comparison_nfe: int = 20,
) -> dict[str, np.ndarray]:
  """The figures' tables (see the module docstring). source_images `[2P, H, W, C]` in
  [-1, 1]: image 0 for Fig. 7, pairs (2i, 2i + 1) for Fig. 8, pair (0, 1) for Fig. 9."""
  source_images = np.asarray(source_images, np.float32)
  if len(source_images) < 2 or len(source_images) % 2:
    raise ValueError(
      f"source_images must hold an even number >= 2 of images, got {source_images.shape}."
    )
  num_t, rng = diffusion.num_timesteps, jax.random.PRNGKey(seed)
  common = dict(clip_denoised=clip_denoised)
  pairs_a, pairs_b = source_images[0::2], source_images[1::2]
  keys = sample_keys(rng, 0, num_samples)  # The first samples of run_sampling's seed.
  specs = comparison_specs(num_t, comparison_nfe, clip_denoised)
  return {
    "samplers": sampler_comparison(diffusion, model, params, keys, source_images.shape[1:], specs),
    "progressive_generation": progressive_generation(
      diffusion, model, params, keys, source_images.shape[1:], **common
    ),
    "shared_latents": shared_latents(
      diffusion,
      model,
      params,
      source_images[0],
      jax.random.fold_in(rng, 7),
      timesteps=[scaled_timestep(k, num_t) for k in SHARED_LATENT_FRACTIONS],
      num_chains=num_chains,
      **common,
    ),
    "interpolation": interpolation(
      diffusion,
      model,
      params,
      pairs_a,
      pairs_b,
      jax.random.fold_in(rng, 8),
      timesteps=[scaled_timestep(INTERPOLATION_FRACTION, num_t)] * len(pairs_a),
      **common,
    ),
    "coarse_to_fine": interpolation(
      diffusion,
      model,
      params,
      pairs_a[0],
      pairs_b[0],
      jax.random.fold_in(rng, 9),
      timesteps=[scaled_timestep(k, num_t) for k in COARSE_TO_FINE_FRACTIONS],
      **common,
    ),
  }


def _comparison_nfe(config: ml_collections.ConfigDict) -> int:
  """`sample.num_steps` when it asks a fast sampler for fewer steps than T, else 20."""
  sample = config.sample
  fast = sample.sampler != "ancestral" and sample.num_steps < config.diffusion.num_timesteps
  return sample.num_steps if fast else 20


def write_figures(
  config: ml_collections.ConfigDict,
  workdir: str,
  ema_params: Any = None,
  *,
  step: int | None = None,
  source_images: np.ndarray | None = None,
  num_pairs: int = 2,
  num_samples: int = 8,
  num_chains: int = 6,
) -> dict[str, str]:
  """Writes the figures as PNGs; returns {name: path}.

  Without `ema_params`, restores those of `sample.checkpoint_step` (-1: latest) from `workdir`.
  The source images default to the first 2 num_pairs of the eval split. The PNGs go to
  `<workdir>/figures/step_<step>/` (`<workdir>/figures/` when `step` is unknown); every process
  computes, process 0 writes.
  """
  validate_config(config, mode="figures")
  bundle = model_bundle.ModelBundle.from_config(config)
  if ema_params is None:
    ema_params, step = bundle.load_ema_params(workdir, config.sample.checkpoint_step)
  if source_images is None:
    source_images = eval_images(config, 2 * num_pairs)
  tables = figure_tables(
    bundle.diffusion,
    bundle.model,
    jax.device_get(ema_params),
    source_images,
    seed=config.sample.seed,
    num_samples=num_samples,
    num_chains=num_chains,
    clip_denoised=config.sample.clip_denoised,
    comparison_nfe=_comparison_nfe(config),
  )
  directory = os.path.join(workdir, "figures", "" if step is None else f"step_{step}")
  paths = {name: os.path.join(directory, f"{name}.png") for name in tables}
  if jax.process_index() == 0:
    for name, table in tables.items():
      image_grid.save_png(paths[name], tile(table))
    logging.info("Wrote the figures to %s", directory)
  return paths
