"""Tests of ddpm_jax.solvers: DDIM, NFE and tracing invariants, the probability-flow ODE of
Gaussian data in closed form, and equality with diffusers' DPMSolverMultistepScheduler and
HeunDiscreteScheduler on the same U-Net, x_T and timesteps (torch + diffusers: extra
`test-diffusers`; those tests skip without them)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_diffusion import MU, S, T, linear_diffusion, optimal_eps_model, true_reverse_model

from ddpm_jax import diffusion as diff
from ddpm_jax import solvers
from ddpm_jax.models import UNet

GRIDS = {  # (spacing, karras)
  "linspace": ("linspace", False),
  "trailing": ("trailing", False),
  "karras": ("linspace", True),
  "trailing_karras": ("trailing", True),
}


def optimal_predictor(d, mean_type="eps", mu=MU, s=S):
  """`fn(x, t, xp)`: the optimal eps (or x0) predictor for data N(mu, s^2), at integer or
  fractional float t [B], in numpy-like `xp` (jax.numpy or torch) with the same float32 table;
  the noise level at fractional t interpolates log sigma (exact at integer t)."""
  log_sigmas = np.log(solvers.vp_sigmas(d)).astype(np.float32)

  def fn(x, t, xp):
    low = xp.clip(xp.floor(t), 0, d.num_timesteps - 2)
    w = t - low
    low = low.astype(np.int32) if xp is jnp else low.long()
    table = jnp.asarray(log_sigmas) if xp is jnp else xp.from_numpy(log_sigmas)
    log_sigma = (table[low] * (1 - w) + table[low + 1] * w).reshape(-1, 1, 1, 1)
    abar = 1 / (1 + xp.exp(2 * log_sigma))
    m, v = xp.sqrt(abar) * mu, abar * s**2 + 1 - abar
    if mean_type == "eps":
      return xp.sqrt(1 - abar) * (x - m) / v
    return mu + s**2 * xp.sqrt(abar) * (x - m) / v

  return fn


def gaussian_model(d, mean_type="eps"):
  """`optimal_predictor` as a model_fn(x, t) of N(MU, S^2) data."""
  fn = optimal_predictor(d, mean_type)
  return lambda x, t: fn(x, t.astype(jnp.float32), jnp)


def x_T_of(rng, shape):
  """x_T as `ddim_sample_loop` draws it from `rng`."""
  return diff._normal(diff._split(rng)[0], shape)


# -- DDIM, grids, orders, NFE and tracing. ------------------------------------------------------


@pytest.mark.parametrize("mean_type", ["eps", "xstart", "xprev"])
def test_order_one_on_ddims_grid_is_ddim_with_eta_zero(mean_type):
  if mean_type == "xprev":  # The exact reverse step of Gaussian data, with its variance.
    d = linear_diffusion(model_mean_type="xprev", model_var_type="learned", loss_type="kl")
    model = true_reverse_model(d)
  else:
    d = linear_diffusion(model_mean_type=mean_type)
    model = gaussian_model(d, mean_type)
  rng, shape = jax.random.PRNGKey(3), (16, 2, 2, 1)
  plan = solvers.dpm_solver_plan(solvers.timestep_grid(d, d.ddim_timesteps(10)[::-1]), order=1)
  for clip in (False, True):
    ours = solvers.dpm_solver_sample_from(d, model, x_T_of(rng, shape), plan, clip)
    ddim = d.ddim_sample_loop(model, shape, rng, num_steps=10, eta=0.0, clip_denoised=clip)
    np.testing.assert_allclose(ours, ddim, rtol=0, atol=2e-5)


def test_order_one_over_all_steps_is_ddim_from_the_same_keys():
  """Trailing spacing with N = T is DDIM's grid over all T steps; per-example keys draw x_T."""
  d = linear_diffusion()
  grid = solvers.dpm_solver_grid(d, T, spacing="trailing")
  np.testing.assert_array_equal(grid.t, d.ddim_timesteps(T)[::-1])
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  sample = solvers.make_solver(
    d, solvers.SolverSpec("dpm_solver", T, order=1, spacing="trailing", clip_denoised=True)
  )
  ours = jax.jit(lambda keys: sample(optimal_eps_model(d), (8, 2, 2, 1), keys))(keys)
  ddim = d.ddim_sample_loop(optimal_eps_model(d), (8, 2, 2, 1), keys, num_steps=T, eta=0.0)
  np.testing.assert_allclose(ours, ddim, rtol=0, atol=2e-5)


def test_grids_follow_diffusers_spacings():
  d = linear_diffusion()
  np.testing.assert_array_equal(
    solvers.dpm_solver_grid(d, 10).t, [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
  )
  np.testing.assert_array_equal(
    solvers.dpm_solver_grid(d, 10, spacing="trailing").t, range(999, 0, -100)
  )
  np.testing.assert_allclose(solvers.heun_grid(d, 10).t, range(999, -1, -111))
  # diffusers' float arange gives trailing N = 61 a 62nd time, -1; ours keeps 61 steps.
  assert solvers.dpm_solver_grid(d, 61, spacing="trailing").t.min() == 15
  table = solvers.vp_sigmas(d)
  np.testing.assert_allclose(solvers.sigma_to_t(table, table), np.arange(T), atol=1e-9)
  for grid in (solvers.dpm_solver_grid(d, 12, karras=True), solvers.heun_grid(d, 12, karras=True)):
    np.testing.assert_allclose(grid.sigmas[[0, -2, -1]], [table[-1], table[0], 0.0], rtol=1e-12)
    assert np.all(np.diff(grid.sigmas) < 0) and np.all(np.diff(grid.t) <= 0)
  assert solvers.dpm_solver_grid(d, 12, karras=True).t.dtype == np.int64


def test_step_orders_warm_up_and_lower_the_final_steps():
  d = linear_diffusion()
  orders = lambda n, order, lof=True: list(
    solvers.dpm_solver_plan(solvers.dpm_solver_grid(d, n), order=order, lower_order_final=lof)[
      "order"
    ]
  )
  assert orders(10, 3) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
  assert orders(10, 3, lof=False) == [1, 2] + [3] * 7 + [1]
  assert orders(15, 3) == [1, 2] + [3] * 12 + [1]
  assert orders(6, 2) == [1, 2, 2, 2, 2, 1]
  assert orders(4, 1) == [1, 1, 1, 1]
  plan = solvers.dpm_solver_plan(solvers.dpm_solver_grid(d, 10), order=3)
  # The last step lands on sigma = 0: x_0 is the last prediction.
  np.testing.assert_array_equal(plan["c_m"][-1], [1.0, 0.0, 0.0])
  assert plan["c_x"][-1] == 0.0


def test_nfe_is_counted_honestly():
  assert [solvers.num_function_evals(s, 10) for s in solvers.SAMPLERS] == [10, 10, 10, 19]
  assert solvers.num_function_evals("heun", 1) == 1
  d = linear_diffusion()
  for spec in (
    solvers.SolverSpec("dpm_solver", 7, order=3),
    solvers.SolverSpec("heun", 7),
    solvers.SolverSpec("heun", 1, karras=True),
  ):
    calls = []

    def model_fn(x, t, calls=calls):
      jax.debug.callback(lambda: calls.append(1))
      return jnp.zeros_like(x)

    jax.block_until_ready(
      jax.jit(
        lambda key, spec=spec, model_fn=model_fn: solvers.make_solver(d, spec)(
          model_fn, (2, 2, 2, 1), key
        )
      )(jax.random.PRNGKey(0))
    )
    assert len(calls) == spec.nfe == len(spec.plan(d)["t"])


@pytest.mark.parametrize(
  "spec",
  [solvers.SolverSpec("dpm_solver", 20, order=3), solvers.SolverSpec("heun", 20, karras=True)],
  ids=["dpm_solver", "heun"],
)
def test_the_compiled_loop_traces_the_model_once(spec):
  calls = []

  def model_fn(x, t):
    calls.append(1)
    return jnp.zeros_like(x)

  sample = solvers.make_solver(linear_diffusion(), spec)
  jax.jit(lambda key: sample(model_fn, (2, 4, 4, 1), key)).lower(jax.random.PRNGKey(0))
  assert len(calls) == 1


def test_per_example_keys_make_samples_independent_of_the_batch():
  d = linear_diffusion()
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  for spec in (solvers.SolverSpec("dpm_solver", 10), solvers.SolverSpec("heun", 5)):
    sample = solvers.make_solver(d, spec)
    whole = sample(gaussian_model(d), (4, 2, 2, 1), keys)
    halves = [sample(gaussian_model(d), (2, 2, 2, 1), keys[i : i + 2]) for i in (0, 2)]
    np.testing.assert_allclose(whole, np.concatenate(halves), atol=1e-6)
    assert not np.allclose(whole[0], whole[1])
    assert sample(gaussian_model(d), (3, 2, 2, 1), jax.random.PRNGKey(1)).shape == (3, 2, 2, 1)


def jsd_diffusion():
  """beta = 1/T .. 1: abar_{T-1} = 0, an infinite noise level."""
  betas = diff.get_beta_schedule("jsd", beta_start=0, beta_end=0, num_timesteps=10)
  with np.errstate(divide="ignore"):
    return diff.GaussianDiffusion(betas=betas)


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: solvers.SolverSpec("euler", 10), "sampler='euler' is not allowed"),
    (lambda: solvers.SolverSpec("dpm_solver", 10, order=4), "order=4 is not allowed"),
    (lambda: solvers.SolverSpec("heun", 10, spacing="leading"), "spacing='leading'"),
    (lambda: solvers.SolverSpec("dpm_solver", 0).plan(linear_diffusion()), r"\[1, 1000\]"),
    (lambda: solvers.SolverSpec("heun", T + 1).plan(linear_diffusion()), r"\[1, 1000\]"),
    (lambda: solvers.SolverSpec("dpm_solver", T).plan(linear_diffusion()), "repeats timesteps"),
    (
      lambda: solvers.SolverSpec("heun", 10).plan(linear_diffusion(model_mean_type="xprev")),
      "fractional times",
    ),
    (lambda: solvers.dpm_solver_grid(jsd_diffusion(), 5), "abar = 0"),
    (lambda: solvers.timestep_grid(linear_diffusion(), [5, 1000]), "timesteps must be"),
    (lambda: solvers.num_function_evals("heun", 0), "num_steps must be >= 1"),
  ],
)
def test_bad_settings_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# -- The probability-flow ODE of Gaussian data. --------------------------------------------------


def pf_ode_then_denoise(d, x_T, sigma_last):
  """The exact flow of N(MU, S^2) data from x_T (VP, step T-1) to VE noise level sigma_last,
  then E[x_0 | x] there: what every solver ends with (its last step denoises from sigma_last)."""

  def moments(sigma):
    abar = 1 / (1 + sigma**2)
    return np.sqrt(abar) * MU, abar * S**2 + 1 - abar, abar

  m_T, v_T, _ = moments(solvers.vp_sigmas(d)[-1])
  m, v, abar = moments(sigma_last)
  x = m + np.sqrt(v / v_T) * (np.asarray(x_T, np.float64) - m_T)  # The monotone (affine) flow.
  return MU + S**2 * np.sqrt(abar) * (x - m) / v


@functools.cache
def _closed_form_run(spec):
  """(max |sample - closed form|, samples) of `spec` at 50 steps from 2000 fixed x_T."""
  d = linear_diffusion()
  x_T = jax.random.normal(jax.random.PRNGKey(0), (2000, 2, 2, 1))
  plan = spec.plan(d)
  sigma_last = plan["sigma"][-1] / plan["alpha"][-1] if "alpha" in plan else plan["sigma"][-1]
  sample_from = solvers.make_solver_from(d, spec)
  out = np.asarray(jax.jit(lambda x_T: sample_from(gaussian_model(d), x_T))(x_T))
  return np.abs(out - pf_ode_then_denoise(d, x_T, sigma_last)).max(), out


@pytest.mark.parametrize(
  "sampler, order, grid, tol",
  [
    ("dpm_solver", 2, "linspace", 0.03),
    ("dpm_solver", 2, "trailing", 0.03),
    ("dpm_solver", 3, "linspace", 0.012),
    ("dpm_solver", 3, "trailing", 0.012),
    ("dpm_solver", 3, "karras", 0.005),
    ("heun", 2, "linspace", 0.015),
    ("heun", 2, "karras", 0.015),
  ],
)
def test_solvers_follow_the_probability_flow_of_gaussian_data(sampler, order, grid, tol):
  """50 steps: each sample lands near its closed-form destination, far nearer than DDIM's (order
  1) on the same grid, and the samples have the data's mean and spread."""
  spacing, karras = GRIDS[grid]
  spec = solvers.SolverSpec(sampler, 50, order=order, spacing=spacing, karras=karras)
  err, out = _closed_form_run(spec)
  assert err < tol
  ddim = solvers.SolverSpec("dpm_solver", 50, order=1, spacing=spacing, karras=karras)
  assert err < _closed_form_run(ddim)[0] / 3
  assert out.mean() == pytest.approx(MU, abs=0.02)
  assert out.std() == pytest.approx(S, rel=0.03)


# -- Equality with diffusers on a U-Net. ---------------------------------------------------------

# The network: the optimal predictor of N(0.1, 0.8^2) data plus 0.2 x a random-weight U-Net, so
# that the ODE lands on O(1) samples (a bare random network is no denoiser: its samples reach
# |x| ~ 600, where float32 alone differs by ~1e-4) and clipping to [-1, 1] is active.
DATA_MU, DATA_S, UNET_SCALE = 0.1, 0.8, 0.2
UNET = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


X_T_SHAPE = (3, 8, 8, 1)


def stock_tolerance(karras):
  """Against diffusers as shipped: 1e-4; Karras grids end at diffusers' float32 sigma(t=0),
  8e-5 off, which moves every Karras sigma and time (measured up to 9.7e-5: margin for CPUs)."""
  return 2e-4 if karras else 1e-4


@functools.cache
def _peer():
  """(our UNet, its random params, diffusers' UNet2DModel with those weights), 8x8x1."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from conftest import tiny_digits_config

  torch.set_num_threads(1)  # Tiny convolutions; more threads only contend with XLA's.

  from benchmarks import peer

  config = tiny_digits_config()
  config.model.update(UNET)
  unet = UNet(out_ch=1, **UNET)
  x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), x, t))["params"]
  rng = np.random.default_rng(0)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shapes, sep="/").items():
    fan_in = math.prod(leaf.shape[:-1]) if path.endswith("/kernel") else 1
    value = rng.normal(size=leaf.shape) / math.sqrt(fan_in) * (1.0 if fan_in > 1 else 0.1)
    flat[path] = (value + path.endswith("/scale")).astype(np.float32)
  params = traverse_util.unflatten_dict(flat, sep="/")
  return unet, params, peer.build_model(config, params)


def _jax_model(d, mean_type):
  unet, params, _ = _peer()
  optimal = optimal_predictor(d, mean_type, DATA_MU, DATA_S)

  def model_fn(x, t):
    t = t.astype(jnp.float32)
    return optimal(x, t, jnp) + UNET_SCALE * unet.apply({"params": params}, x, t)

  return model_fn


def _torch_model(d, mean_type):
  import torch

  _, _, module = _peer()
  optimal = optimal_predictor(d, mean_type, DATA_MU, DATA_S)

  def model_fn(x, t):  # x [B, C, H, W], t a 0-d tensor (int64 or float32).
    t = t.to(torch.float32).reshape(1).expand(x.shape[0])
    with torch.inference_mode():
      return optimal(x, t, torch) + UNET_SCALE * module(x, t).sample

  return model_fn


@functools.cache
def _compiled(sampler, mean_type, clip):
  """Our sampler jitted over (x_T, plan): one compile per plan length serves every grid."""
  d = linear_diffusion(model_mean_type=mean_type)
  run = {"dpm_solver": solvers.dpm_solver_sample_from, "heun": solvers.heun_sample_from}[sampler]
  return d, jax.jit(lambda x_T, plan: run(d, _jax_model(d, mean_type), x_T, plan, clip))


def _ours(sampler, mean_type, clip, spec, x_T):
  d, fn = _compiled(sampler, mean_type, clip)
  plan = {
    k: np.asarray(v, np.float32) if v.dtype == np.float64 else v for k, v in spec.plan(d).items()
  }
  return np.asarray(fn(x_T, plan)), d


def _diffusers_loop(scheduler, model_fn, latents, num_steps):
  """diffusers' sampling loop: set_timesteps, scale_model_input, the network, step."""
  scheduler.set_timesteps(num_steps)
  x = latents
  for t in scheduler.timesteps:
    x = scheduler.step(model_fn(scheduler.scale_model_input(x, t), t), t, x).prev_sample
  return x


def _theirs(d, mean_type, make_scheduler, x_T, num_steps, *, heun, float64_table):
  """Runs diffusers from x_T (NHWC numpy); Heun starts at x_VE = x_T sqrt(1 + sigma_0^2).

  `float64_table` gives the scheduler our float64 abar (diffusers computes it in float32, whose
  sigma(t=0) is off by 8e-5 relative): what is left is the algorithms' difference.
  """
  import torch

  scheduler = make_scheduler(
    trained_betas=d.betas,
    num_train_timesteps=d.num_timesteps,
    prediction_type="epsilon" if mean_type == "eps" else "sample",
  )
  if float64_table:
    scheduler.alphas_cumprod = torch.tensor(d.alphas_cumprod)
  latents = torch.tensor(np.asarray(x_T).transpose(0, 3, 1, 2))
  if heun:
    scheduler.set_timesteps(num_steps)
    latents = latents * (1 + scheduler.sigmas[0] ** 2) ** 0.5
  out = _diffusers_loop(scheduler, _torch_model(d, mean_type), latents, num_steps)
  return out.numpy().transpose(0, 2, 3, 1), scheduler


# diffusers' schedulers call np.array on torch tensors, which numpy 2 flags.
quiet_diffusers = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@quiet_diffusers
@pytest.mark.parametrize(
  "mean_type, order, grid, num_steps, clip, lower_order_final",
  [
    *[
      ("eps", order, grid, n, False, True)
      for order in (2, 3)
      for grid in ("linspace", "trailing", "karras")
      for n in (10, 25)
    ],
    ("eps", 3, "linspace", 10, False, False),
    ("eps", 3, "linspace", 10, True, True),
    ("eps", 2, "karras", 10, True, True),
    ("xstart", 2, "linspace", 10, False, True),
    ("xstart", 3, "trailing", 10, False, True),
    ("xstart", 3, "karras", 10, False, True),
  ],
)
def test_dpm_solver_matches_diffusers(mean_type, order, grid, num_steps, clip, lower_order_final):
  diffusers = pytest.importorskip("diffusers")
  spacing, karras = GRIDS[grid]
  spec = solvers.SolverSpec(
    "dpm_solver",
    num_steps,
    order=order,
    spacing=spacing,
    karras=karras,
    lower_order_final=lower_order_final,
  )
  x_T = jax.random.normal(jax.random.PRNGKey(num_steps), X_T_SHAPE)
  ours, d = _ours("dpm_solver", mean_type, clip, spec, x_T)
  make = functools.partial(
    diffusers.DPMSolverMultistepScheduler,
    algorithm_type="dpmsolver++",
    solver_order=order,
    timestep_spacing=spacing,
    use_karras_sigmas=karras,
    lower_order_final=lower_order_final,
    thresholding=clip,
    sample_max_value=1.0,
  )  # Thresholding at 1.0 is clipping to [-1, 1].
  for float64_table, tol in ((False, stock_tolerance(karras)), (True, 1e-5)):
    theirs, scheduler = _theirs(
      d, mean_type, make, x_T, num_steps, heun=False, float64_table=float64_table
    )
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), spec.plan(d)["t"])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol)
  assert np.abs(ours).max() > (0.99 if clip else 1.5)


@quiet_diffusers
@pytest.mark.parametrize(
  "mean_type, grid, num_steps, clip",
  [
    *[("eps", grid, n, False) for grid in GRIDS for n in (10, 25)],
    ("eps", "linspace", 10, True),
    ("eps", "karras", 10, True),
    ("xstart", "linspace", 10, False),
    ("xstart", "trailing_karras", 10, False),
  ],
)
def test_heun_matches_diffusers(mean_type, grid, num_steps, clip):
  diffusers = pytest.importorskip("diffusers")
  spacing, karras = GRIDS[grid]
  spec = solvers.SolverSpec("heun", num_steps, spacing=spacing, karras=karras)
  x_T = jax.random.normal(jax.random.PRNGKey(num_steps), X_T_SHAPE)
  ours, d = _ours("heun", mean_type, clip, spec, x_T)
  make = functools.partial(
    diffusers.HeunDiscreteScheduler,
    timestep_spacing=spacing,
    use_karras_sigmas=karras,
    clip_sample=clip,
  )
  # An x0 model's slope (x - x0) / sigma divides by diffusers' float32 sigma(t=0) (8e-5 off):
  # that end of the linspace grid is compared with the float64 table only. The slopes at
  # sigma(0) = 0.01 also amplify float32 rounding ~30x there: 3e-5 for the algorithms.
  stock = mean_type == "eps" or spacing == "trailing"
  for float64_table, tol in ((False, stock_tolerance(karras)), (True, 3e-5))[0 if stock else 1 :]:
    theirs, scheduler = _theirs(
      d, mean_type, make, x_T, num_steps, heun=True, float64_table=float64_table
    )
    plan = spec.plan(d)
    np.testing.assert_allclose(
      scheduler.timesteps.numpy(), plan["t"], rtol=0, atol=1e-4 if float64_table else 1e-2
    )
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol)
  assert len(scheduler.timesteps) == spec.nfe
  assert np.abs(ours).max() > (0.99 if clip else 1.5)
