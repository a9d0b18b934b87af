"""Tests of ddpm_jax.diffusion against independent float64 computations and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from ddpm_jax import diffusion as diff

T = 1000


def linear_diffusion(**kwargs):
  betas = diff.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  return diff.GaussianDiffusion(betas=betas, **kwargs)


# -- Schedules and tables. ---------------------------------------------------------------------


def test_schedules_match_their_formulas():
  kw = dict(beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  get = lambda name: diff.get_beta_schedule(name, **kw)
  np.testing.assert_allclose(get("linear")[[0, 1, 999]], [1e-4, 1e-4 + 0.0199 / 999, 0.02])
  quad = get("quad")
  np.testing.assert_allclose(np.sqrt(quad), np.linspace(0.01, math.sqrt(0.02), T), rtol=1e-12)
  np.testing.assert_array_equal(get("const"), np.full(T, 0.02))
  for name, n in (("warmup10", 100), ("warmup50", 500)):
    b = get(name)
    np.testing.assert_allclose(b[:n], np.linspace(1e-4, 0.02, n))
    np.testing.assert_array_equal(b[n:], 0.02)
  jsd = get("jsd")
  np.testing.assert_allclose(jsd[[0, 998, 999]], [1 / 1000, 1 / 2, 1.0])
  for name in diff.BETA_SCHEDULES:
    b = get(name)
    assert b.dtype == np.float64 and b.shape == (T,)


def test_cosine_schedule_follows_nichol_dhariwal():
  betas = diff.get_beta_schedule("cosine", beta_start=0, beta_end=0, num_timesteps=T)
  f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
  abar = np.cumprod(1 - betas)
  # Where the 0.999 cap is not active, abar_t equals f(t+1) / f(0).
  np.testing.assert_allclose(abar[:990], [f(t + 1) / f(0) for t in range(990)], rtol=1e-9)
  assert betas.max() == pytest.approx(0.999)
  assert np.all(np.diff(betas) >= 0)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (
      dict(name="sigmoid"),
      "beta_schedule='sigmoid' is not allowed: allowed values are linear, quad",
    ),
    (dict(name="linear", beta_start=0.0), "0 < beta <= 1"),
    (dict(name="linear", beta_end=1.5), "0 < beta <= 1"),
  ],
)
def test_bad_schedules_raise(kwargs, match):
  full = dict(name="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T) | kwargs
  name = full.pop("name")
  with pytest.raises(ValueError, match=match):
    diff.get_beta_schedule(name, **full)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(model_mean_type="v"), "model_mean_type='v'.*eps, xstart, xprev"),
    (dict(model_var_type="big"), "model_var_type='big'.*fixedlarge"),
    (dict(loss_type="l1"), "loss_type='l1'.*mse, kl, hybrid"),
    (dict(model_var_type="learned", loss_type="mse"), "'mse' cannot train.*'learned'"),
    (dict(model_var_type="fixedsmall", loss_type="hybrid"), "'hybrid' needs a learned"),
  ],
)
def test_bad_combinations_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    linear_diffusion(**kwargs)


def test_tables_against_independent_float64_computation():
  d = linear_diffusion()
  betas = np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)])
  abar = np.array([np.prod(1 - betas[: i + 1]) for i in range(T)])
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-10)
  np.testing.assert_allclose(d.alphas_cumprod_prev, abar_prev, rtol=1e-10)
  np.testing.assert_allclose(d.posterior_variance, post_var, rtol=1e-10)
  np.testing.assert_allclose(
    d.posterior_mean_coef1, betas * np.sqrt(abar_prev) / (1 - abar), rtol=1e-10
  )
  np.testing.assert_allclose(
    d.posterior_mean_coef2, (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar), rtol=1e-10
  )
  np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / abar - 1), rtol=1e-10)
  assert d.posterior_variance[0] == 0.0
  np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(post_var[1:]))
  # The spec's constants for linear / 1000.
  assert d.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-4)
  assert d.posterior_variance[1] == pytest.approx(5.4532e-5, rel=1e-4)
  assert d.posterior_log_variance_clipped[0] == pytest.approx(-9.81673, abs=1e-5)
  for table in (d.alphas_cumprod, d.posterior_variance, d.posterior_mean_coef1):
    assert table.dtype == np.float64


# -- The forward process. ----------------------------------------------------------------------


def test_q_sample_moments():
  d = linear_diffusion()
  n = 200_000
  x0 = jnp.full((n, 1, 1, 1), 0.7)
  for t in (0, 100, 500, 999):
    noise = jax.random.normal(jax.random.PRNGKey(t), x0.shape)
    x_t = np.asarray(d.q_sample(x0, jnp.full((n,), t), noise)).ravel()
    moments = d.q_mean_variance(x0[:1], jnp.array([t]))
    mean, var, log_var = (float(np.asarray(v).ravel()[0]) for v in moments)
    assert mean == pytest.approx(math.sqrt(d.alphas_cumprod[t]) * 0.7, rel=1e-6)
    assert var == pytest.approx(1 - d.alphas_cumprod[t], rel=1e-5)
    assert log_var == pytest.approx(math.log1p(-d.alphas_cumprod[t]), rel=1e-5)
    assert x_t.mean() == pytest.approx(mean, abs=5 * math.sqrt(var / n))
    assert x_t.var() == pytest.approx(var, rel=0.02)


def test_posterior_matches_bayes_rule():
  """q(x_{t-1} | x_t, x_0) by multiplying q(x_{t-1} | x_0) and q(x_t | x_{t-1}) in float64."""
  d = linear_diffusion()
  x0, x_t = 0.3, -0.4
  for t in (1, 10, 500, 999):
    abar_prev, alpha, beta = d.alphas_cumprod[t - 1], 1 - d.betas[t], d.betas[t]
    precision = 1 / (1 - abar_prev) + alpha / beta
    var = 1 / precision
    mean = var * (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(alpha) * x_t / beta)
    m, v, lv = d.q_posterior_mean_variance(
      jnp.full((1, 1), x0), jnp.full((1, 1), x_t), jnp.array([t])
    )
    assert float(m[0, 0]) == pytest.approx(mean, rel=1e-5)
    assert float(v[0, 0]) == pytest.approx(var, rel=1e-5)
    assert float(lv[0, 0]) == pytest.approx(math.log(var), rel=1e-5)


def test_predict_xstart_inverts_q_sample_and_posterior():
  d = linear_diffusion()
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (8, 4, 4, 3)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  t = jnp.array([1, 5, 50, 200, 400, 600, 800, 900])
  x_t = d.q_sample(x0, t, eps)
  np.testing.assert_allclose(d.predict_xstart_from_eps(x_t, t, eps), x0, atol=2e-4)
  np.testing.assert_allclose(d.predict_eps_from_xstart(x_t, t, x0), eps, atol=2e-4)
  mean, _, _ = d.q_posterior_mean_variance(x0, x_t, t)
  np.testing.assert_allclose(d.predict_xstart_from_xprev(x_t, t, mean), x0, atol=2e-3)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_three_mean_types_agree(var_type):
  """Perfect eps, x0 and mean predictors give the same p(x_{t-1} | x_t)."""
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.uniform(-0.9, 0.9, (6, 4, 4, 3)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  t = jnp.array([0, 3, 100, 500, 900, 999])
  base = linear_diffusion(model_var_type=var_type)
  x_t = base.q_sample(x0, t, eps)
  posterior_mean, _, _ = base.q_posterior_mean_variance(x0, x_t, t)
  outputs = {"eps": eps, "xstart": x0, "xprev": posterior_mean}
  results = {}
  for mean_type, output in outputs.items():
    d = linear_diffusion(model_mean_type=mean_type, model_var_type=var_type)
    results[mean_type] = d.p_mean_variance(lambda x, t, o=output: o, x_t, t, clip_denoised=False)
  for key in ("mean", "log_variance"):
    np.testing.assert_allclose(results["eps"][key], results["xstart"][key], atol=3e-4)
    np.testing.assert_allclose(results["eps"][key], results["xprev"][key], atol=3e-4)
  np.testing.assert_allclose(results["eps"]["pred_xstart"], x0, atol=3e-3)
  np.testing.assert_allclose(results["eps"]["mean"], posterior_mean, atol=3e-4)


def test_fixed_variances_follow_the_spec():
  x = jnp.zeros((3, 1, 1, 1))
  t = jnp.array([0, 1, 999])
  model = lambda x, t: jnp.zeros_like(x)
  d = linear_diffusion(model_var_type="fixedlarge")
  out = d.p_mean_variance(model, x, t)
  np.testing.assert_allclose(out["variance"].ravel(), d.betas[[0, 1, 999]], rtol=1e-6)
  np.testing.assert_allclose(
    out["log_variance"].ravel(),
    np.log([d.posterior_variance[1], d.betas[1], d.betas[999]]),
    rtol=1e-6,
  )
  d = linear_diffusion(model_var_type="fixedsmall")
  out = d.p_mean_variance(model, x, t)
  np.testing.assert_allclose(
    out["log_variance"].ravel(), [-9.81673, -9.81673, np.log(d.posterior_variance[999])], rtol=1e-5
  )


def test_learned_range_interpolates_between_the_fixed_variances():
  d = linear_diffusion(model_var_type="learned_range", loss_type="kl")
  x = jnp.zeros((2, 1, 1, 1))
  t = jnp.array([10, 10])
  v = jnp.array([-1.0, 1.0]).reshape(2, 1, 1, 1)
  out = d.p_mean_variance(lambda x, t: jnp.concatenate([x, v], -1), x, t)
  np.testing.assert_allclose(
    out["log_variance"].ravel(),
    [d.posterior_log_variance_clipped[10], np.log(d.betas[10])],
    rtol=1e-6,
  )


def test_wrong_output_channels_are_reported():
  d = linear_diffusion(model_var_type="learned", loss_type="kl")
  with pytest.raises(ValueError, match="expected 6 channels"):
    d.p_mean_variance(lambda x, t: x, jnp.zeros((1, 2, 2, 3)), jnp.array([3]))


# -- KL and decoder terms. ---------------------------------------------------------------------


def test_normal_kl_against_integration():
  for m1, lv1, m2, lv2 in [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.2, 0.5), (1.0, -4.0, 0.9, -3.0)]:
    p = stats.norm(m1, math.exp(0.5 * lv1))
    q = stats.norm(m2, math.exp(0.5 * lv2))
    f = lambda x, p=p, q=q: p.pdf(x) * (p.logpdf(x) - q.logpdf(x))
    expected, _ = integrate.quad(f, m1 - 20 * p.std(), m1 + 20 * p.std(), points=[m1], limit=200)
    got = float(diff.normal_kl(m1, lv1, m2, lv2))
    assert got == pytest.approx(expected, abs=1e-6, rel=1e-5)


def test_discretized_gaussian_against_integrated_density():
  mean, log_scale = 0.1, math.log(0.05)
  dist = stats.norm(mean, 0.05)
  for x in (-1.0, -0.5, 0.0, 0.1 + 1 / 255, 0.2, 1.0):
    lo = -np.inf if x < -0.999 else x - 1 / 255
    hi = np.inf if x > 0.999 else x + 1 / 255
    expected = math.log(max(dist.cdf(hi) - dist.cdf(lo), 1e-12))
    got = float(
      diff.discretized_gaussian_log_likelihood(
        jnp.array(x), means=jnp.array(mean), log_scales=jnp.array(log_scale)
      )
    )
    # The tanh approximation of the CDF is good to about 2e-4 absolute.
    assert math.exp(got) == pytest.approx(math.exp(expected), abs=5e-4)
  # The 256 bins of [-1, 1] hold all the probability mass.
  xs = jnp.linspace(-1, 1, 256)
  total = jnp.sum(
    jnp.exp(
      diff.discretized_gaussian_log_likelihood(
        xs, means=jnp.full_like(xs, mean), log_scales=jnp.full_like(xs, log_scale)
      )
    )
  )
  assert float(total) == pytest.approx(1.0, abs=1e-4)


def test_prior_bpd_is_tiny_and_matches_formula():
  d = linear_diffusion()
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
  abar = d.alphas_cumprod[-1]
  m = math.sqrt(abar) * np.asarray(x0, np.float64)
  expected = 0.5 * (-1 - math.log(1 - abar) + (1 - abar) + m**2).mean(axis=(1, 2, 3)) / math.log(2)
  np.testing.assert_allclose(d.prior_bpd(x0), expected, rtol=1e-3, atol=1e-9)
  assert np.all(np.asarray(d.prior_bpd(x0)) < 1e-4)


# -- Gaussian data: the optimal denoiser is known in closed form. -------------------------------

MU, S = 0.1, 0.3  # Per-dimension data distribution N(MU, S^2).


def gaussian_moments(d, t, table):
  """Mean factor and variance of x at step t (or x_0 when table gives abar_prev = 1)."""
  abar = jnp.asarray(table, jnp.float32)[t].reshape(-1, 1, 1, 1)
  return jnp.sqrt(abar) * MU, abar * S**2 + 1 - abar


def optimal_eps_model(d):
  """E[eps | x_t] for x_0 ~ N(MU, S^2)."""

  def model_fn(x, t):
    m, v = gaussian_moments(d, t, d.alphas_cumprod)
    abar = jnp.asarray(d.alphas_cumprod, jnp.float32)[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - abar) * (x - m) / v

  return model_fn


def true_reverse_model(d):
  """The exact q(x_{t-1} | x_t) for Gaussian data, as [mean | log variance] (xprev, learned)."""

  def model_fn(x, t):
    m, v = gaussian_moments(d, t, d.alphas_cumprod)
    m_prev, v_prev = gaussian_moments(d, t, d.alphas_cumprod_prev)
    alpha = jnp.asarray(d.alphas, jnp.float32)[t].reshape(-1, 1, 1, 1)
    mean = m_prev + jnp.sqrt(alpha) * v_prev / v * (x - m)
    var = v_prev - alpha * v_prev**2 / v
    return jnp.concatenate([mean, jnp.log(var) * jnp.ones_like(x)], axis=-1)

  return model_fn


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_sampler_reproduces_gaussian_data(var_type):
  d = linear_diffusion(model_var_type=var_type)
  sample = jax.jit(
    lambda rng: d.p_sample_loop(optimal_eps_model(d), (4000, 2, 2, 1), rng, clip_denoised=False)
  )
  x = np.asarray(sample(jax.random.PRNGKey(0))).ravel()
  assert x.mean() == pytest.approx(MU, abs=0.02)
  assert x.std() == pytest.approx(S, rel=0.04)
  assert abs(stats.skew(x)) < 0.1


def test_ddim_with_eta_one_over_all_steps_is_the_ancestral_sampler():
  d = linear_diffusion(model_var_type="fixedsmall")
  model = optimal_eps_model(d)
  rng = jax.random.PRNGKey(7)
  for clip in (False, True):
    ancestral = d.p_sample_loop(model, (64, 2, 2, 1), rng, clip_denoised=clip)
    ddim = d.ddim_sample_loop(model, (64, 2, 2, 1), rng, num_steps=T, eta=1.0, clip_denoised=clip)
    np.testing.assert_allclose(ddim, ancestral, atol=2e-4)
  # fixedlarge uses other variances: the two must differ there.
  large = linear_diffusion(model_var_type="fixedlarge")
  assert not np.allclose(large.p_sample_loop(model, (64, 2, 2, 1), rng), ddim, atol=1e-2)


def test_ddim_deterministic_sampler_reproduces_gaussian_data():
  d = linear_diffusion()
  model = optimal_eps_model(d)
  stds = []
  for num_steps in (50, 1000):
    x = np.asarray(
      d.ddim_sample_loop(
        model,
        (4000, 2, 2, 1),
        jax.random.PRNGKey(0),
        num_steps=num_steps,
        eta=0.0,
        clip_denoised=False,
      )
    ).ravel()
    assert x.mean() == pytest.approx(MU, abs=0.02)
    stds.append(x.std())
  # The ODE's discretisation error shrinks the spread a little at 50 steps, not at 1000.
  assert stds[1] == pytest.approx(S, rel=0.03)
  assert S * 0.85 < stds[0] < stds[1]
  # eta = 0: the result is a function of x_T alone (same keys, batched: x_T is per example).
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  a = d.ddim_sample_loop(model, (3, 2, 2, 1), keys, num_steps=10, eta=0.0)
  b = d.ddim_sample_loop(model, (3, 2, 2, 1), keys, num_steps=10, eta=0.0)
  c = d.ddim_sample_loop(model, (3, 2, 2, 1), keys, num_steps=10, eta=1.0)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  np.testing.assert_array_equal(d.ddim_timesteps(5), [0, 250, 500, 749, 999])
  with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
    d.ddim_timesteps(0)


def test_sampling_is_one_compiled_loop():
  d = linear_diffusion()
  calls = []

  def model_fn(x, t):
    calls.append(1)
    return jnp.zeros_like(x)

  jax.jit(lambda rng: d.p_sample_loop(model_fn, (2, 4, 4, 1), rng)).lower(jax.random.PRNGKey(0))
  assert len(calls) == 1


def test_progressive_sampling_matches_the_loop_and_records_x0():
  d = linear_diffusion()
  model = optimal_eps_model(d)
  rng = jax.random.PRNGKey(3)
  final = d.p_sample_loop(model, (2, 2, 2, 1), rng)
  final_p, preds = d.p_sample_loop_progressive(model, (2, 2, 2, 1), rng)
  np.testing.assert_allclose(final, final_p, atol=1e-6)
  assert preds.shape == (2, 20, 2, 2, 1)
  # Slot 0 is the x0 predicted at the last step (t = 0), the sample itself up to the small noise.
  np.testing.assert_allclose(preds[:, 0], final, atol=0.05)
  # Early predictions (slot 19, t = 950) are near the data mean, far from the final sample.
  assert float(jnp.abs(preds[:, 19] - MU).max()) < 0.2
  assert np.all(np.asarray(preds) != 0)


def test_per_example_keys_make_samples_independent_of_the_batch():
  d = linear_diffusion()
  model = optimal_eps_model(d)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  whole = d.p_sample_loop(model, (4, 2, 2, 1), keys)
  halves = [d.p_sample_loop(model, (2, 2, 2, 1), keys[i : i + 2]) for i in (0, 2)]
  np.testing.assert_allclose(whole, np.concatenate(halves), atol=1e-6)
  assert not np.allclose(whole[0], whole[1])
  typed = jax.random.split(jax.random.key(0), 4)
  out = d.calc_bpd_loop(model, whole, typed, clip_denoised=False)
  assert out["total_bpd"].shape == (4,)


def test_interpolation_endpoints_and_shared_noise():
  d = linear_diffusion()
  model = optimal_eps_model(d)
  rng = jax.random.PRNGKey(5)
  x_a = jnp.full((1, 2, 2, 1), -0.5)
  x_b = jnp.full((1, 2, 2, 1), 0.5)
  x_c = jnp.full((1, 2, 2, 1), 0.9)
  at_a = d.interpolate(model, x_a, x_b, 0.0, 2, rng)
  np.testing.assert_allclose(at_a, d.interpolate(model, x_a, x_c, 0.0, 2, rng), atol=1e-6)
  # At small t the reverse chain stays near the source image.
  np.testing.assert_allclose(at_a, x_a, atol=0.1)
  at_b = d.interpolate(model, x_a, x_b, 1.0, 2, rng)
  np.testing.assert_allclose(at_b, x_b, atol=0.1)
  mid = d.interpolate(model, x_a, x_b, 0.5, 2, rng)
  assert float(jnp.abs(mid).max()) < 0.15


def test_last_reverse_step_is_noiseless():
  d = linear_diffusion()
  x = jnp.ones((2, 2, 2, 1)) * 0.3
  model = lambda x, t: jnp.zeros_like(x)
  t0 = jnp.zeros((2,), jnp.int32)
  a = d.p_sample(model, x, t0, jax.random.PRNGKey(0))["sample"]
  b = d.p_sample(model, x, t0, jax.random.PRNGKey(1))["sample"]
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, d.p_mean_variance(model, x, t0)["mean"])
  t1 = jnp.ones((2,), jnp.int32)
  assert not np.allclose(
    d.p_sample(model, x, t1, jax.random.PRNGKey(0))["sample"],
    d.p_sample(model, x, t1, jax.random.PRNGKey(1))["sample"],
  )


def discretized_gaussian_data(n, dims, seed):
  rng = np.random.default_rng(seed)
  x = np.clip(np.round((rng.normal(MU, S, (n, dims, 1, 1)) + 1) * 127.5), 0, 255)
  return jnp.asarray(x / 127.5 - 1, jnp.float32)


def exact_nll_bits_per_dim(x0):
  """-log2 P(x_0) `[B]` per dimension under the discretized N(MU, S^2) the data came from."""
  x = np.asarray(x0, np.float64)
  lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
  hi = np.where(x > 0.999, np.inf, x + 1 / 255)
  dist = stats.norm(MU, S)
  return -np.log2(dist.cdf(hi) - dist.cdf(lo)).mean(axis=(1, 2, 3))


def test_calc_bpd_loop_is_a_tight_bound_with_the_true_reverse_process():
  d = linear_diffusion(model_mean_type="xprev", model_var_type="learned", loss_type="kl")
  x0 = discretized_gaussian_data(2048, 8, seed=0)
  out = jax.jit(lambda x, r: d.calc_bpd_loop(true_reverse_model(d), x, r, clip_denoised=False))(
    x0, jax.random.PRNGKey(0)
  )
  assert out["terms_bpd"].shape == (2048, T) and out["mse"].shape == (2048, T)
  np.testing.assert_allclose(
    out["total_bpd"], out["terms_bpd"].sum(1) + out["prior_bpd"], rtol=1e-5
  )
  gap = np.asarray(out["total_bpd"], np.float64) - exact_nll_bits_per_dim(x0)
  stderr = gap.std() / math.sqrt(gap.size)
  # With the true reverse process the bound is tight up to the discretisation of the decoder
  # at t = 0 (its width is about one 8-bit bin), and never below the NLL.
  assert stderr < 0.015
  assert -3 * stderr < gap.mean() < 0.04
  # The predicted x0 error shrinks as t goes to 0.
  mse = np.asarray(out["mse"]).mean(0)
  assert mse[0] < mse[100] < mse[500] < mse[999]


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_calc_bpd_loop_terms_match_their_expectation_under_gaussian_data(var_type):
  """E[L_t] in closed form for the optimal eps model with fixed variances, t >= 1."""
  d = linear_diffusion(model_var_type=var_type)
  x0 = discretized_gaussian_data(256, 4, seed=1)
  out = jax.jit(lambda x, r: d.calc_bpd_loop(optimal_eps_model(d), x, r, clip_denoised=False))(
    x0, jax.random.PRNGKey(1)
  )
  abar = d.alphas_cumprod
  var_q = d.posterior_variance[1:]
  var_p = (d.betas if var_type == "fixedlarge" else d.posterior_variance)[1:]
  var_x0_given_xt = (S**2 * (1 - abar) / (abar * S**2 + 1 - abar))[1:]
  expected = (
    0.5
    * (
      -1
      + np.log(var_p / var_q)
      + var_q / var_p
      + d.posterior_mean_coef1[1:] ** 2 * var_x0_given_xt / var_p
    )
    / math.log(2)
  )
  got = np.asarray(out["terms_bpd"], np.float64)[:, 1:].sum(1)
  stderr = got.std() / math.sqrt(got.size)
  assert got.mean() == pytest.approx(expected.sum(), abs=3 * stderr + 0.01 * expected.sum())
  # Either way the bound lies above the exact NLL.
  total = np.asarray(out["total_bpd"], np.float64) - exact_nll_bits_per_dim(x0)
  assert total.mean() > 0


# -- Training losses. --------------------------------------------------------------------------


def test_mse_loss_targets():
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 4, 4, 3)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  t = jnp.array([0, 10, 500, 999])
  d = linear_diffusion()
  assert np.all(np.asarray(d.training_losses(lambda x, t: noise, x0, t, noise)) == 0)
  zero = d.training_losses(lambda x, t: jnp.zeros_like(x), x0, t, noise)
  np.testing.assert_allclose(zero, np.mean(np.asarray(noise) ** 2, axis=(1, 2, 3)), rtol=1e-6)
  d = linear_diffusion(model_mean_type="xstart")
  assert float(jnp.max(d.training_losses(lambda x, t: x0, x0, t, noise))) == 0
  d = linear_diffusion(model_mean_type="xprev")
  x_t = d.q_sample(x0, t, noise)
  mean, _, _ = d.q_posterior_mean_variance(x0, x_t, t)
  assert float(jnp.max(d.training_losses(lambda x, t: mean, x0, t, noise))) < 1e-10


def test_kl_loss_equals_the_bound_term():
  rng = np.random.default_rng(3)
  x0 = jnp.asarray(np.round(rng.uniform(0, 255, (4, 4, 4, 3))) / 127.5 - 1, jnp.float32)
  noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  t = jnp.array([0, 10, 500, 999])
  model = lambda x, t: 0.5 * x
  d = linear_diffusion(loss_type="kl")
  loss = d.training_losses(model, x0, t, noise)
  terms, _ = d.vb_terms_bpd(model, x0, d.q_sample(x0, t, noise), t, clip_denoised=False)
  np.testing.assert_allclose(loss, terms, rtol=1e-6)
  assert np.all(np.asarray(loss) > 0)


def test_hybrid_loss_trains_the_mean_only_through_mse():
  rng = np.random.default_rng(4)
  x0 = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  t = jnp.array([5, 300])
  d = linear_diffusion(model_var_type="learned_range", loss_type="hybrid")

  def loss(mean_out, var_out):
    out = jnp.concatenate([mean_out, var_out], -1)
    return jnp.sum(d.training_losses(lambda x, t: out, x0, t, noise))

  mean_out, var_out = jnp.zeros_like(x0), jnp.zeros_like(x0)
  g_mean, g_var = jax.grad(loss, argnums=(0, 1))(mean_out, var_out)
  # d mse / d mean = 2 (mean - eps) / n, nothing from the bound.
  np.testing.assert_allclose(g_mean, 2 * (mean_out - noise) / 16, rtol=1e-5)
  assert float(jnp.abs(g_var).max()) > 0
