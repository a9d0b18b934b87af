"""Fast ODE samplers of a trained DDPM: DPM-Solver++ (Lu et al. 2022) and EDM's Heun (Karras et al.
2022), held equal to diffusers' `DPMSolverMultistepScheduler` and `HeunDiscreteScheduler`.

Pure functions of a `GaussianDiffusion`; no Flax, no device code, no I/O. Each sampler is built
in two stages: a *grid* (`Grid`: the model's times and the noise levels sigma, float64 numpy) and
a *plan* (a dict of float64 / int numpy arrays with every per-step coefficient), then one
`lax.fori_loop` over the plan that calls the model once per iteration, so the model is traced
once per compiled sampler. Plans of the same length have the same structure and may be passed
as jit arguments (one compiled program serves every order, spacing and grid of that length).

Noise levels are VE sigmas, sigma = sqrt((1 - abar) / abar) (so x_VE = x_VP / sqrt(abar) =
x_0 + sigma eps), as diffusers uses. x_T `[B, H, W, C]` is the VP latent at the first time,
drawn exactly as `GaussianDiffusion.ddim_sample_loop` draws it, so DDIM, DPM-Solver++ and Heun
start from the same x_T for the same keys. Every sampler returns x_0 `[B, H, W, C]`.

  spec = SolverSpec("dpm_solver", num_steps=20, order=3)
  sample = make_solver(diffusion, spec)        # sample(model_fn, shape, rng) -> x0
  spec.nfe                                     # 20 network evaluations per image
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax.diffusion import GaussianDiffusion, check_choice

Array = Any
ModelFn = Callable[[Array, Array], Array]
Plan = dict[str, np.ndarray]

SOLVERS = ("dpm_solver", "heun")
SAMPLERS = ("ancestral", "ddim") + SOLVERS  # What `num_function_evals` knows.
SPACINGS = ("linspace", "trailing")
KARRAS_RHO = 7.0  # Karras et al. (2022), eq. 5.


class Grid(NamedTuple):
  """The times of a solver: `t` `[N]` the model's (descending) times, `sigmas` `[N + 1]` the VE
  noise levels of the N steps' starts, then 0 (the end of the last step)."""

  t: np.ndarray
  sigmas: np.ndarray


def vp_sigmas(diffusion: GaussianDiffusion) -> np.ndarray:
  """The VE noise level of every diffusion step, sqrt((1 - abar_t) / abar_t), float64 `[T]`."""
  abar = diffusion.alphas_cumprod
  with np.errstate(divide="ignore"):
    sigmas = np.sqrt((1.0 - abar) / abar)
  if not np.all(np.isfinite(sigmas)):
    raise ValueError(
      "The ODE solvers need abar_t > 0 for every t (finite noise levels); this "
      "beta schedule reaches abar = 0 (beta = 1): use ancestral or ddim sampling."
    )
  return sigmas


def sigma_to_t(sigmas: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Fractional times of `sigmas` by linear interpolation in log sigma of `table` `[T]` (clamped
  to [0, T-1]), as diffusers' `_sigma_to_t`."""
  log_table = np.log(table)
  log_sigma = np.log(np.maximum(sigmas, 1e-10))
  low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(table) - 2)
  w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0.0, 1.0)
  return (1.0 - w) * low + w * (low + 1)


def karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int) -> np.ndarray:
  """`num_steps` noise levels from sigma_max to sigma_min, uniform in sigma^(1/rho) (EDM eq. 5)."""
  ramp = np.linspace(0.0, 1.0, num_steps)
  inv_max, inv_min = sigma_max ** (1 / KARRAS_RHO), sigma_min ** (1 / KARRAS_RHO)
  return (inv_max + ramp * (inv_min - inv_max)) ** KARRAS_RHO


def spaced_timesteps(
  num_timesteps: int, num_steps: int, spacing: str, *, endpoint: bool
) -> np.ndarray:
  """Descending float64 times `[num_steps]` in [0, T-1], diffusers' `timestep_spacing`.

  `linspace`: evenly from T-1 down; with `endpoint` the last is 0 (Heun's grid), without it the
  grid has num_steps + 1 points and drops the 0 (DPM-Solver's). `trailing`: round(T - k T/N) - 1,
  k < N (computed without diffusers' float `arange`, which yields a spurious N+1-th time -1 for
  some N, e.g. N = 61 of T = 1000).
  """
  check_choice("spacing", spacing, SPACINGS)
  if spacing == "trailing":
    return np.round(num_timesteps - np.arange(num_steps) * (num_timesteps / num_steps)) - 1.0
  if endpoint:
    return np.linspace(0, num_timesteps - 1, num_steps)[::-1].copy()
  return np.round(np.linspace(0, num_timesteps - 1, num_steps + 1))[::-1][:-1].copy()


def _check_num_steps(diffusion: GaussianDiffusion, num_steps: int) -> None:
  if not 1 <= num_steps <= diffusion.num_timesteps:
    raise ValueError(
      f"num_steps must be in [1, {diffusion.num_timesteps}] (the number of "
      f"diffusion steps), got {num_steps}."
    )


def _with_final_zero(t: np.ndarray, sigmas: np.ndarray, what: str) -> Grid:
  if np.any(np.diff(sigmas) >= 0):
    raise ValueError(
      f"{what} repeats noise levels ({len(np.unique(sigmas))} distinct of "
      f"{len(sigmas)}); use fewer steps."
    )
  return Grid(t=t, sigmas=np.append(sigmas, 0.0))


# -- DPM-Solver++ (multistep, data prediction). -------------------------------------------------


def timestep_grid(diffusion: GaussianDiffusion, timesteps: np.ndarray) -> Grid:
  """A DPM-Solver grid on given integer `timesteps` `[N]` (descending), ending at sigma = 0.

  `timestep_grid(d, d.ddim_timesteps(n)[::-1])` is DDIM's grid: order 1 there is DDIM, eta 0.
  """
  t = np.asarray(timesteps, np.int64)
  if t.ndim != 1 or t.size == 0 or t.min() < 0 or t.max() >= diffusion.num_timesteps:
    raise ValueError(
      f"timesteps must be a non-empty 1-D array in [0, {diffusion.num_timesteps - 1}], got {t}."
    )
  return _with_final_zero(t, vp_sigmas(diffusion)[t], f"these {len(t)} timesteps")


def dpm_solver_grid(
  diffusion: GaussianDiffusion, num_steps: int, *, spacing: str = "linspace", karras: bool = False
) -> Grid:
  """The grid of `DPMSolverMultistepScheduler.set_timesteps(num_steps)`: integer times `[N]`.

  Without `karras` the times follow `spacing`; both end at t ~ T/N, and the last step returns the
  x_0 predicted there (t = 0 is never evaluated: on uniform times a last step down to t = 0 would
  jump in log-SNR many times the others, which orders 2-3 amplify). With `karras` the sigmas are
  Karras' from sigma(T-1) down to sigma(0) (spacing is ignored, as in diffusers), the model sees
  each sigma's time rounded to an integer, and the solver steps between the exact sigmas.
  """
  _check_num_steps(diffusion, num_steps)
  table = vp_sigmas(diffusion)
  if karras:
    sigmas = karras_sigmas(table[-1], table[0], num_steps)
    t = np.round(sigma_to_t(sigmas, table)).astype(np.int64)
    return _with_final_zero(t, sigmas, f"karras with num_steps={num_steps}")
  t = spaced_timesteps(diffusion.num_timesteps, num_steps, spacing, endpoint=False)
  if len(np.unique(t)) < num_steps:
    raise ValueError(
      f"spacing {spacing!r} with num_steps={num_steps} repeats timesteps of the "
      f"T={diffusion.num_timesteps} steps; use fewer steps."
    )
  return timestep_grid(diffusion, t.astype(np.int64))


def _step_orders(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
  """Each step's order as diffusers picks it: warm-up (1, 2, ..), first order into sigma = 0,
  at most second order one step before when `lower_order_final` and fewer than 15 steps."""
  orders = np.minimum(np.arange(num_steps) + 1, order)
  if lower_order_final and 2 <= num_steps < 15:
    orders[-2] = min(orders[-2], 2)
  orders[-1] = 1
  return orders


def _dpm_step_weights(
  lam: np.ndarray, alpha_t: float, ratio: float, i: int, order: int
) -> np.ndarray:
  """Weights `[3]` of (m_i, m_{i-1}, m_{i-2}), the x_0 predictions of steps i, i-1, i-2, in the
  update of step i (DPM-Solver++ paper alg. 2; diffusers' midpoint 2nd and 3rd order forms).

  lam `[N + 1]` = log(alpha / sigma) of the grid; ratio = exp(-h) = sigma_{i+1} / sigma_i (VE).
  """
  phi1 = alpha_t * (1.0 - ratio)
  if order == 1:
    return np.array([phi1, 0.0, 0.0])
  h = lam[i + 1] - lam[i]
  r0 = (lam[i] - lam[i - 1]) / h
  d1_0 = np.array([1.0, -1.0, 0.0]) / r0  # D1_0 = (m0 - m1) / r0.
  if order == 2:
    return phi1 * np.array([1.0, 0.0, 0.0]) + 0.5 * phi1 * d1_0
  r1 = (lam[i - 1] - lam[i - 2]) / h
  d1_1 = np.array([0.0, 1.0, -1.0]) / r1
  d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
  d2 = (d1_0 - d1_1) / (r0 + r1)
  phi2 = alpha_t * ((ratio - 1.0) / h + 1.0)
  phi3 = alpha_t * ((ratio - 1.0 + h) / h**2 - 0.5)
  return phi1 * np.array([1.0, 0.0, 0.0]) + phi2 * d1 - phi3 * d2


def dpm_solver_plan(grid: Grid, *, order: int = 2, lower_order_final: bool = True) -> Plan:
  """float64 coefficients of DPM-Solver++ of `order` (1, 2 or 3) on `grid`, N steps:

  x_{i+1} = c_x[i] x_i + sum_k c_m[i, k] m_{i-k}, m_i the x_0 predicted at step i from
  x_i = alpha[i] x_0 + sigma[i] eps (VP). Keys: `t` `[N]` int, `alpha`, `sigma`, `c_x` `[N]`,
  `c_m` `[N, 3]`, `order` `[N]` (each step's order, informational).
  """
  check_choice("order", order, (1, 2, 3))
  sigmas = grid.sigmas
  alpha = 1.0 / np.sqrt(1.0 + sigmas**2)
  sigma_vp = sigmas * alpha
  with np.errstate(divide="ignore"):
    lam = -np.log(sigmas)  # log(alpha / sigma_vp); +inf at the final sigma = 0.
  n = len(grid.t)
  orders = _step_orders(n, order, lower_order_final)
  c_m = np.stack(
    [
      _dpm_step_weights(lam, alpha[i + 1], sigmas[i + 1] / sigmas[i], i, int(orders[i]))
      for i in range(n)
    ]
  )
  return dict(
    t=np.asarray(grid.t, np.int64),
    alpha=alpha[:-1],
    sigma=sigma_vp[:-1],
    c_x=sigma_vp[1:] / sigma_vp[:-1],
    c_m=c_m,
    order=orders,
  )


def _clip(x: Array, clip_denoised: bool) -> Array:
  return jnp.clip(x, -1.0, 1.0) if clip_denoised else x


def _xstart_vp(diffusion, output, x, t, alpha, sigma, clip_denoised):
  """x_0 predicted from the model output at x = alpha x_0 + sigma eps (VP), integer t `[B]`."""
  mean_output, _ = diffusion.split_output(output, x)
  if diffusion.model_mean_type == "eps":
    pred = (x - sigma * mean_output) / alpha
  elif diffusion.model_mean_type == "xstart":
    pred = mean_output
  else:
    pred = diffusion.predict_xstart_from_xprev(x, t, mean_output)
  return _clip(pred, clip_denoised)


def _float32(plan: Plan, keys: tuple[str, ...]) -> dict[str, Array]:
  return {k: jnp.asarray(plan[k], jnp.float32) for k in keys}


def dpm_solver_sample_from(
  diffusion: GaussianDiffusion,
  model_fn: ModelFn,
  x_T: Array,
  plan: Plan,
  clip_denoised: bool = False,
) -> Array:
  """Runs DPM-Solver++ `plan` from the VP latent x_T `[B, H, W, C]`; returns x_0 `[B, H, W, C]`.

  The model sees x and integer t `[B]` (int32); `clip_denoised` clips each predicted x_0 to
  [-1, 1] (diffusers: `thresholding=True, sample_max_value=1.0`).
  """
  t = jnp.asarray(plan["t"], jnp.int32)
  coef = _float32(plan, ("alpha", "sigma", "c_x", "c_m"))
  batch = x_T.shape[0]

  def body(i, carry):
    x, m1, m2 = carry
    t_b = jnp.full((batch,), t[i], jnp.int32)
    m0 = _xstart_vp(
      diffusion, model_fn(x, t_b), x, t_b, coef["alpha"][i], coef["sigma"][i], clip_denoised
    )
    c = coef["c_m"][i]
    return coef["c_x"][i] * x + c[0] * m0 + c[1] * m1 + c[2] * m2, m0, m1

  zeros = jnp.zeros_like(x_T)
  return jax.lax.fori_loop(0, plan["t"].shape[0], body, (x_T, zeros, zeros))[0]


# -- Heun (EDM, Karras et al. 2022, alg. 1 with gamma = 0). -------------------------------------


def heun_grid(
  diffusion: GaussianDiffusion, num_steps: int, *, spacing: str = "linspace", karras: bool = False
) -> Grid:
  """The grid of `HeunDiscreteScheduler.set_timesteps(num_steps)`: fractional times `[N]`.

  Without `karras`: times by `spacing` (linspace ends at t = 0), sigma linearly interpolated in
  the sigma table. With `karras`: Karras sigmas between those of the spacing's first and last
  times, each time from its sigma by interpolating log sigma (`sigma_to_t`).
  """
  _check_num_steps(diffusion, num_steps)
  table = vp_sigmas(diffusion)
  t = spaced_timesteps(diffusion.num_timesteps, num_steps, spacing, endpoint=True)
  sigmas = np.interp(t, np.arange(len(table)), table)
  if karras:
    sigmas = karras_sigmas(sigmas[0], sigmas[-1], num_steps)
    t = sigma_to_t(sigmas, table)
  return _with_final_zero(t, sigmas, f"heun with num_steps={num_steps}")


def heun_plan(grid: Grid) -> Plan:
  """Per network evaluation (2N - 1 of them: Euler and correction of each step, Euler only into
  sigma = 0): `t` the model's time, `sigma` the VE noise level of the evaluated point, `c_in` =
  1/sqrt(1 + sigma^2) (VE -> VP input scaling), `dt` the step's sigma_{i+1} - sigma_i, `euler`
  (bool) whether the evaluation starts a step. All `[2N - 1]`, float64 but `euler`."""
  t, sigmas = np.asarray(grid.t, np.float64), grid.sigmas
  n = len(t)
  step = np.append(np.repeat(np.arange(n - 1), 2), n - 1)  # The step of each evaluation.
  euler = np.append(np.tile([True, False], n - 1), True)
  at = step + ~euler  # Where the evaluated point is: a step's start, or (correction) its end.
  return dict(
    t=t[at],
    sigma=sigmas[at],
    c_in=1.0 / np.sqrt(1.0 + sigmas[at] ** 2),
    dt=sigmas[step + 1] - sigmas[step],
    euler=euler,
  )


def _denoised_ve(diffusion, output, x, sigma, clip_denoised):
  """EDM's denoiser D(x; sigma) from the model output at x_VE = x_0 + sigma eps."""
  mean_output, _ = diffusion.split_output(output, x)
  pred = x - sigma * mean_output if diffusion.model_mean_type == "eps" else mean_output
  return _clip(pred, clip_denoised)


def _check_heun_model(diffusion: GaussianDiffusion) -> None:
  if diffusion.model_mean_type == "xprev":
    raise ValueError(
      "heun evaluates the model at fractional times, where an xprev model's "
      "output has no conversion to x_0; use dpm_solver or ddim for xprev models."
    )


def heun_sample_from(
  diffusion: GaussianDiffusion,
  model_fn: ModelFn,
  x_T: Array,
  plan: Plan,
  clip_denoised: bool = False,
) -> Array:
  """Runs Heun `plan` from the VP latent x_T `[B, H, W, C]`; returns x_0 `[B, H, W, C]`.

  Works on x_VE = x_T sqrt(1 + sigma_0^2); the model sees x_VE / sqrt(1 + sigma^2) (VP) and the
  fractional time t `[B]` (float32). eps and xstart models; `clip_denoised` clips each predicted
  x_0 (diffusers: `clip_sample=True`).
  """
  _check_heun_model(diffusion)
  coef = _float32(plan, ("t", "sigma", "c_in", "dt"))
  euler = jnp.asarray(plan["euler"], jnp.bool_)
  batch = x_T.shape[0]

  def body(k, carry):
    x, x_start, d_start = carry  # The step's start and its slope (read by the correction).
    t_b = jnp.full((batch,), coef["t"][k], jnp.float32)
    sigma = coef["sigma"][k]
    denoised = _denoised_ve(diffusion, model_fn(x * coef["c_in"][k], t_b), x, sigma, clip_denoised)
    d = (x - denoised) / sigma
    base = jnp.where(euler[k], x, x_start)
    slope = jnp.where(euler[k], d, (d_start + d) / 2)
    return base + slope * coef["dt"][k], base, d

  x_ve = x_T / coef["c_in"][0]
  return jax.lax.fori_loop(0, plan["t"].shape[0], body, (x_ve, x_ve, jnp.zeros_like(x_ve)))[0]


# -- The registry. ------------------------------------------------------------------------------


def num_function_evals(sampler: str, num_steps: int) -> int:
  """Network evaluations per image: `num_steps` for ancestral, ddim and dpm_solver, 2 per step
  but 1 for the last (into sigma = 0) for heun."""
  check_choice("sampler", sampler, SAMPLERS)
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  return 2 * num_steps - 1 if sampler == "heun" else num_steps


@dataclasses.dataclass(frozen=True)
class SolverSpec:
  """An ODE sampler: `sampler` ('dpm_solver' | 'heun') over `num_steps` steps.

  `order` (dpm_solver only: 1, 2 or 3; 1 is DDIM with eta 0), `spacing` ('linspace' | 'trailing',
  the times as diffusers' `timestep_spacing`), `karras` (Karras et al.'s noise levels instead),
  `lower_order_final` (dpm_solver: at most second order in the second-to-last step when
  num_steps < 15; the last step is always first order), `clip_denoised` (clip each predicted
  x_0 to [-1, 1]; off in diffusers' defaults, the product passes `sample.clip_denoised`).
  """

  sampler: str
  num_steps: int
  order: int = 2
  spacing: str = "linspace"
  karras: bool = False
  lower_order_final: bool = True
  clip_denoised: bool = False

  def __post_init__(self):
    check_choice("sampler", self.sampler, SOLVERS)
    check_choice("spacing", self.spacing, SPACINGS)
    check_choice("order", self.order, (1, 2, 3))

  @property
  def nfe(self) -> int:
    return num_function_evals(self.sampler, self.num_steps)

  def plan(self, diffusion: GaussianDiffusion) -> Plan:
    """The float64 plan of this spec for `diffusion` (see `dpm_solver_plan`, `heun_plan`)."""
    if self.sampler == "heun":
      _check_heun_model(diffusion)
      return heun_plan(
        heun_grid(diffusion, self.num_steps, spacing=self.spacing, karras=self.karras)
      )
    grid = dpm_solver_grid(diffusion, self.num_steps, spacing=self.spacing, karras=self.karras)
    return dpm_solver_plan(grid, order=self.order, lower_order_final=self.lower_order_final)


_SAMPLE_FROM = {"dpm_solver": dpm_solver_sample_from, "heun": heun_sample_from}


def make_solver_from(
  diffusion: GaussianDiffusion, spec: SolverSpec
) -> Callable[[ModelFn, Array], Array]:
  """`sample_from(model_fn, x_T [B, H, W, C]) -> x_0 [B, H, W, C]`, x_T the VP latent."""
  plan, run = spec.plan(diffusion), _SAMPLE_FROM[spec.sampler]
  return lambda model_fn, x_T: run(diffusion, model_fn, x_T, plan, spec.clip_denoised)


def make_solver(
  diffusion: GaussianDiffusion, spec: SolverSpec
) -> Callable[[ModelFn, tuple[int, ...], Array], Array]:
  """`sample(model_fn, shape [B, H, W, C], rng) -> x_0 [B, H, W, C]`, rng one key or per-example
  keys `[B, 2]`; x_T is drawn as `ddim_sample_loop` draws it (the same for the same keys)."""
  sample_from = make_solver_from(diffusion, spec)

  def sample(model_fn: ModelFn, shape: tuple[int, ...], rng: Array) -> Array:
    return sample_from(model_fn, diffusion_lib.draw_x_T(rng, shape)[0])

  return sample
