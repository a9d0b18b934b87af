"""The diffusion process of DDPM (Ho et al. 2020) as pure, jittable functions.

No Flax, no device code, no I/O. Time is 0-based as in the original code: code step `t` is the
paper's step t+1, and the network receives the integer t in [0, T). Tables are computed once in
float64 numpy and cast to float32 when gathered.

A model is any `model_fn(x_t, t) -> output`, x_t `[B, H, W, C]` in [-1, 1] scale, t int32 `[B]`;
the output is `[B, H, W, C]`, or `[B, H, W, 2C]` for learned variances. Loops over T are
`lax.fori_loop` / `lax.scan`, so a sampler traced under `jax.jit` calls the model once per trace.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
ModelFn = Callable[[Array, Array], Array]

BETA_SCHEDULES = ("linear", "quad", "const", "warmup10", "warmup50", "jsd", "cosine")
MODEL_MEAN_TYPES = ("eps", "xstart", "xprev")
MODEL_VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
LEARNED_VAR_TYPES = ("learned", "learned_range")


def check_choice(field: str, value: Any, allowed: tuple[Any, ...]) -> None:
  """Raises ValueError("<field>=<value> is not allowed: allowed values are ...") unless `value`
  is one of `allowed` (config validation reports its fields with this too)."""
  if value not in allowed:
    raise ValueError(
      f"{field}={value!r} is not allowed: allowed values are {', '.join(map(str, allowed))}."
    )


def _warmup_beta(beta_start, beta_end, num_timesteps, warmup_frac):
  betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  warmup_time = int(num_timesteps * warmup_frac)
  betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999):
  """Nichol & Dhariwal (2021), eq. 17: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  abar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
  return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def get_beta_schedule(
  name: str, *, beta_start: float, beta_end: float, num_timesteps: int
) -> np.ndarray:
  """Returns the betas `[num_timesteps]` (float64) of a named schedule."""
  check_choice("beta_schedule", name, BETA_SCHEDULES)
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == "quad":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  elif name == "const":
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  elif name == "warmup10":
    betas = _warmup_beta(beta_start, beta_end, num_timesteps, 0.1)
  elif name == "warmup50":
    betas = _warmup_beta(beta_start, beta_end, num_timesteps, 0.5)
  elif name == "jsd":  # 1/T, 1/(T-1), ..., 1.
    betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
  else:
    betas = _cosine_betas(num_timesteps)
  _check_betas(betas)
  return betas


def _check_betas(betas: np.ndarray) -> None:
  if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
    bad = betas[~((betas > 0) & (betas <= 1))] if betas.ndim == 1 else betas
    raise ValueError(
      f"betas must be a 1-D array with 0 < beta <= 1; got values such as {bad[:3]} "
      "(check diffusion.beta_start and diffusion.beta_end)."
    )


# ----------------------------------------------------------------------------------------------
# Gaussian helpers (nats).


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def approx_standard_normal_cdf(x: Array) -> Array:
  """The tanh approximation of the standard normal CDF used by the original code."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, *, means: Array, log_scales: Array) -> Array:
  """log p(x) of 8-bit data `x` in [-1, 1] under a Gaussian discretised to bins of width 2/255.

  The outermost bins extend to -inf / +inf. Returns nats, same shape as `x`.
  """
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(
    x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
  )


def mean_flat(x: Array) -> Array:
  """Mean over all axes but the first: `[B, ...]` -> `[B]`."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _extract(table: np.ndarray, t: Array, x_shape: tuple[int, ...]) -> Array:
  """Gathers `table[t]` as float32 and shapes it `[B, 1, ..., 1]` to broadcast against x."""
  out = jnp.asarray(table, dtype=jnp.float32)[t]
  return out.reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def _is_batched_key(rng: Array) -> bool:
  """Whether `rng` holds one PRNG key per example (`[B]` typed keys or `[B, 2]` raw keys)."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim >= 1
  return rng.ndim >= 2


def _fold_in(rng: Array, data: Array) -> Array:
  if _is_batched_key(rng):
    return jax.vmap(jax.random.fold_in, (0, None))(rng, data)
  return jax.random.fold_in(rng, data)


def _split(rng: Array) -> tuple[Array, Array]:
  if _is_batched_key(rng):
    keys = jax.vmap(jax.random.split)(rng)
    return keys[:, 0], keys[:, 1]
  keys = jax.random.split(rng)
  return keys[0], keys[1]


def draw_x_T(rng: Array, shape: tuple[int, ...]) -> tuple[Array, Array]:
  """(x_T ~ N(0, I) of `shape` [B, H, W, C], the key for the rest of the chain): every sampler
  starts from the same x_T for the same `rng` (one key, or one per example `[B]`)."""
  init_rng, loop_rng = _split(rng)
  return _normal(init_rng, shape), loop_rng


def _normal(rng: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """N(0, I) of `shape` [B, ...]; with per-example keys each example draws from its own key, so
  a sample does not depend on how the batch is split over devices."""
  if _is_batched_key(rng):
    return jax.vmap(lambda key: jax.random.normal(key, tuple(shape[1:]), dtype))(rng)
  return jax.random.normal(rng, shape, dtype)


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """The forward process q and the reverse process p of DDPM, with the float64 tables.

  Attributes:
    betas: `[T]` float64 noise schedule.
    model_mean_type: what the network predicts: `eps`, `xstart` (x0) or `xprev` (the mean).
    model_var_type: `fixedlarge` (beta_t), `fixedsmall` (posterior beta~_t), `learned` (raw log
      variance) or `learned_range` (interpolation between the two, Nichol & Dhariwal 2021).
    loss_type: `mse` (L_simple), `kl` (the variational bound term, bits/dim) or `hybrid`
      (mse + T/1000 * kl with a stop-gradient on the mean, Nichol & Dhariwal 2021).
  """

  betas: np.ndarray
  model_mean_type: str = "eps"
  model_var_type: str = "fixedlarge"
  loss_type: str = "mse"

  def __post_init__(self):
    check_choice("model_mean_type", self.model_mean_type, MODEL_MEAN_TYPES)
    check_choice("model_var_type", self.model_var_type, MODEL_VAR_TYPES)
    check_choice("loss_type", self.loss_type, LOSS_TYPES)
    learned = self.model_var_type in LEARNED_VAR_TYPES
    if self.loss_type == "mse" and learned:
      raise ValueError(
        f"loss_type 'mse' cannot train model_var_type {self.model_var_type!r}: the variance "
        "gets no gradient; use loss_type 'kl' or 'hybrid', or a fixed variance type "
        "('fixedlarge', 'fixedsmall')."
      )
    if self.loss_type == "hybrid" and not learned:
      raise ValueError(
        f"loss_type 'hybrid' needs a learned variance, got model_var_type "
        f"{self.model_var_type!r}; allowed: {', '.join(LEARNED_VAR_TYPES)}."
      )
    betas = np.asarray(self.betas, dtype=np.float64)
    _check_betas(betas)
    self._set_tables(betas)

  def _set_tables(self, betas: np.ndarray) -> None:
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    tables = dict(
      betas=betas,
      alphas=alphas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
      posterior_variance=posterior_variance,
      # beta~_0 = 0: the log is clipped by repeating beta~_1 at t = 0.
      posterior_log_variance_clipped=np.log(
        np.append(posterior_variance[1:2], posterior_variance[1:])
      ),
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )
    for name, value in tables.items():
      value.setflags(write=False)
      object.__setattr__(self, name, value)

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  # -- The forward process q. ------------------------------------------------------------------

  def q_mean_variance(self, x_start: Array, t: Array) -> tuple[Array, Array, Array]:
    """Mean, variance and log variance of q(x_t | x_0), each broadcastable to x `[B, ...]`."""
    mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = _extract(1.0 - self.alphas_cumprod, t, x_start.shape)
    log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance

  def q_sample(self, x_start: Array, t: Array, noise: Array) -> Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4). Shapes `[B, ...]`, t `[B]`."""
    return (
      _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
      + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
    )

  def q_posterior_mean_variance(
    self, x_start: Array, x_t: Array, t: Array
  ) -> tuple[Array, Array, Array]:
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
    mean = (
      _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
      + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = _extract(self.posterior_variance, t, x_t.shape)
    log_variance_clipped = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance_clipped

  def predict_xstart_from_eps(self, x_t: Array, t: Array, eps: Array) -> Array:
    return (
      _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
      - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )

  def predict_xstart_from_xprev(self, x_t: Array, t: Array, xprev: Array) -> Array:
    return (xprev - _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t) / _extract(
      self.posterior_mean_coef1, t, x_t.shape
    )

  def predict_eps_from_xstart(self, x_t: Array, t: Array, pred_xstart: Array) -> Array:
    return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / _extract(
      self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )

  # -- The reverse process p. ------------------------------------------------------------------

  @property
  def learns_variance(self) -> bool:
    return self.model_var_type in LEARNED_VAR_TYPES

  def _variance(self, model_var_values: Array | None, x: Array, t: Array) -> tuple[Array, Array]:
    """Variance and log variance of p(x_{t-1} | x_t) for the configured variance type."""
    if self.model_var_type == "learned":
      return jnp.exp(model_var_values), model_var_values
    if self.model_var_type == "learned_range":
      min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
      max_log = _extract(np.log(self.betas), t, x.shape)
      frac = (model_var_values + 1.0) / 2.0
      log_variance = frac * max_log + (1.0 - frac) * min_log
      return jnp.exp(log_variance), log_variance
    if self.model_var_type == "fixedlarge":
      # beta_t; the log variance takes beta~_1 at t = 0 so that the decoder has a sensible width.
      variance = self.betas
      log_variance = np.log(np.append(self.posterior_variance[1], self.betas[1:]))
    else:
      variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
    ones = jnp.ones_like(x)
    return _extract(variance, t, x.shape) * ones, _extract(log_variance, t, x.shape) * ones

  def split_output(self, model_output: Array, x: Array) -> tuple[Array, Array | None]:
    """The model output `[B, H, W, C]` or `[B, H, W, 2C]` -> (the mean part `[B, H, W, C]`, the
    variance part or None); raises ValueError when it does not fit x and the variance type."""
    channels = x.shape[-1]
    expected = 2 * channels if self.learns_variance else channels
    if model_output.shape[:-1] != x.shape[:-1] or model_output.shape[-1] != expected:
      raise ValueError(
        f"model output shape {model_output.shape} does not fit x {x.shape} with "
        f"model_var_type {self.model_var_type!r}: expected {expected} channels."
      )
    if self.learns_variance:
      return model_output[..., :channels], model_output[..., channels:]
    return model_output, None

  def _mean_from_output(
    self, mean_output: Array, x: Array, t: Array, clip_denoised: bool
  ) -> tuple[Array, Array]:
    """Model mean of p(x_{t-1} | x_t) and the predicted x_0, from the mean part of the output."""
    clip = (lambda z: jnp.clip(z, -1.0, 1.0)) if clip_denoised else (lambda z: z)
    if self.model_mean_type == "xprev":
      pred_xstart = clip(self.predict_xstart_from_xprev(x, t, mean_output))
      return mean_output, pred_xstart
    if self.model_mean_type == "xstart":
      pred_xstart = clip(mean_output)
    else:
      pred_xstart = clip(self.predict_xstart_from_eps(x, t, mean_output))
    model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return model_mean, pred_xstart

  def p_mean_variance(
    self, model_fn: ModelFn, x: Array, t: Array, clip_denoised: bool = True
  ) -> dict[str, Array]:
    """Mean, variance, log variance of p(x_{t-1} | x_t) and the predicted x_0, each `[B, ...]`."""
    mean_output, var_output = self.split_output(model_fn(x, t), x)
    variance, log_variance = self._variance(var_output, x, t)
    mean, pred_xstart = self._mean_from_output(mean_output, x, t, clip_denoised)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

  def p_sample(
    self, model_fn: ModelFn, x: Array, t: Array, rng: Array, clip_denoised: bool = True
  ) -> dict[str, Array]:
    """One reverse step: x_{t-1} = mean + [t != 0] sigma z (Algorithm 2). Returns sample and x0."""
    out = self.p_mean_variance(model_fn, x, t, clip_denoised)
    noise = _normal(rng, x.shape, out["mean"].dtype)
    nonzero_mask = (t != 0).astype(noise.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    sample = out["mean"] + nonzero_mask * jnp.exp(0.5 * out["log_variance"]) * noise
    return dict(sample=sample, pred_xstart=out["pred_xstart"])

  def p_sample_loop_from(
    self,
    model_fn: ModelFn,
    x_t: Array,
    t_start: int | Array,
    rng: Array,
    clip_denoised: bool = True,
  ) -> Array:
    """Runs the reverse chain from x_t at step `t_start` down to x_0. x_t `[B, ...]`.

    The noise of step t is drawn from `fold_in(rng, t)`, so chains that share `rng` share noise.
    `rng` is one key, or one key per example (`[B]`) to make each sample independent of the batch
    it is drawn in.
    """

    def body(i, x):
      t = t_start - i
      t_b = jnp.full((x.shape[0],), t, dtype=jnp.int32)
      return self.p_sample(model_fn, x, t_b, _fold_in(rng, t), clip_denoised)["sample"]

    return jax.lax.fori_loop(0, t_start + 1, body, x_t)

  def p_sample_loop(
    self, model_fn: ModelFn, shape: tuple[int, ...], rng: Array, clip_denoised: bool = True
  ) -> Array:
    """Samples x_0 `shape` = [B, H, W, C] from x_T ~ N(0, I) through all T reverse steps."""
    x_T, loop_rng = draw_x_T(rng, shape)
    return self.p_sample_loop_from(model_fn, x_T, self.num_timesteps - 1, loop_rng, clip_denoised)

  def p_sample_loop_progressive(
    self,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: Array,
    clip_denoised: bool = True,
    include_xstartpred_freq: int = 50,
  ) -> tuple[Array, Array]:
    """Like `p_sample_loop`, also recording the predicted x_0 every `include_xstartpred_freq` steps.

    Returns the sample `[B, H, W, C]` and `[B, T // freq, H, W, C]` predictions, where slot k
    holds the x_0 predicted at step t = k * freq (slot 0 is the last reverse step), as in Fig. 6.
    Uses the same noise as `p_sample_loop` for the same rng.
    """
    num_recorded = self.num_timesteps // include_xstartpred_freq
    x_T, loop_rng = draw_x_T(rng, shape)
    preds = jnp.zeros((shape[0], num_recorded) + tuple(shape[1:]), jnp.float32)

    def body(i, carry):
      x, preds = carry
      t = self.num_timesteps - 1 - i
      t_b = jnp.full((shape[0],), t, dtype=jnp.int32)
      out = self.p_sample(model_fn, x, t_b, _fold_in(loop_rng, t), clip_denoised)
      slot = jnp.minimum(t // include_xstartpred_freq, num_recorded - 1)
      record = (t % include_xstartpred_freq == 0) & (t // include_xstartpred_freq < num_recorded)
      updated = jax.lax.dynamic_update_index_in_dim(preds, out["pred_xstart"], slot, axis=1)
      return out["sample"], jnp.where(record, updated, preds)

    return jax.lax.fori_loop(0, self.num_timesteps, body, (x_T, preds))

  def ddim_timesteps(self, num_steps: int) -> np.ndarray:
    """`num_steps` timesteps spread evenly over [0, T-1], ascending (all T for num_steps=T)."""
    if not 1 <= num_steps <= self.num_timesteps:
      raise ValueError(
        f"num_steps must be in [1, {self.num_timesteps}] (the number of diffusion steps), "
        f"got {num_steps}."
      )
    return np.unique(np.round(np.linspace(0, self.num_timesteps - 1, num_steps)).astype(np.int32))

  def _ddim_coefficients(self, timesteps: np.ndarray, eta: float) -> dict[str, np.ndarray]:
    """float64 coefficients of x_{t'} = c_x0 x0 + c_eps eps + sigma z for each t of `timesteps`,
    t' the previous timestep (or "x_0" with abar = 1 before the first)."""
    abar = self.alphas_cumprod[timesteps]
    abar_prev = np.append(1.0, abar[:-1])
    sigma = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    return dict(
      c_x0=np.sqrt(abar_prev),
      c_eps=np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0)),
      sigma=sigma,
    )

  def ddim_sample_loop(
    self,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: Array,
    *,
    num_steps: int,
    eta: float = 0.0,
    clip_denoised: bool = True,
  ) -> Array:
    """DDIM (Song et al. 2021) over `num_steps` strided timesteps; eta=0 is deterministic.

    x_{t'} = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z with
    sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t'), where x0 (clipped
    if asked) and eps are the model's predictions. With eta = 1 and all T steps this is the
    ancestral sampler with the posterior variance (`fixedsmall`), on the same noise for the same
    rng as `p_sample_loop`. Returns x_0 `shape` = [B, H, W, C].
    """
    timesteps = self.ddim_timesteps(num_steps)
    coef = {
      k: jnp.asarray(v, jnp.float32) for k, v in self._ddim_coefficients(timesteps, eta).items()
    }
    ts = jnp.asarray(timesteps)
    x_T, loop_rng = draw_x_T(rng, shape)

    def body(i, x):
      j = len(timesteps) - 1 - i
      t = ts[j]
      t_b = jnp.full((shape[0],), t, dtype=jnp.int32)
      mean_output, _ = self.split_output(model_fn(x, t_b), x)
      _, pred_xstart = self._mean_from_output(mean_output, x, t_b, clip_denoised)
      eps = self.predict_eps_from_xstart(x, t_b, pred_xstart)
      noise = _normal(_fold_in(loop_rng, t), shape)
      return coef["c_x0"][j] * pred_xstart + coef["c_eps"][j] * eps + coef["sigma"][j] * noise

    return jax.lax.fori_loop(0, len(timesteps), body, x_T)

  def interpolate(
    self,
    model_fn: ModelFn,
    x_start_a: Array,
    x_start_b: Array,
    lam: Array,
    t: int,
    rng: Array,
    clip_denoised: bool = True,
  ) -> Array:
    """Interpolates two images in latent space (Fig. 8): diffuse both to step t, mix, denoise.

    x_t = (1 - lam) q(x_t | x_a) + lam q(x_t | x_b), then the reverse chain from t. Images
    `[B, H, W, C]`, lam `[B]` or a scalar. The same rng gives the same noise for every lam.
    """
    noise_rng, loop_rng = _split(rng)
    rng_a, rng_b = _split(noise_rng)
    t_b = jnp.full((x_start_a.shape[0],), t, dtype=jnp.int32)
    x_t_a = self.q_sample(x_start_a, t_b, _normal(rng_a, x_start_a.shape))
    x_t_b = self.q_sample(x_start_b, t_b, _normal(rng_b, x_start_b.shape))
    lam = jnp.reshape(jnp.asarray(lam, jnp.float32), (-1,) + (1,) * (x_start_a.ndim - 1))
    x_t = (1.0 - lam) * x_t_a + lam * x_t_b
    return self.p_sample_loop_from(model_fn, x_t, t, loop_rng, clip_denoised)

  # -- Losses and the variational bound. -------------------------------------------------------

  def vb_terms_bpd(
    self,
    model_fn: ModelFn,
    x_start: Array,
    x_t: Array,
    t: Array,
    clip_denoised: bool = True,
  ) -> tuple[Array, Array]:
    """The bound's term at t in bits/dim `[B]`: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, the
    discretised decoder NLL at t = 0. Also returns the predicted x_0 `[B, ...]`."""
    out = self.p_mean_variance(model_fn, x_t, t, clip_denoised)
    return self._vb_terms_from_p(out, x_start, x_t, t), out["pred_xstart"]

  def _vb_terms_from_p(self, out: dict[str, Array], x_start, x_t, t) -> Array:
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    kl = mean_flat(kl) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(
      x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )
    decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl)

  def prior_bpd(self, x_start: Array) -> Array:
    """KL(q(x_{T-1} | x_0) || N(0, I)) in bits/dim `[B]`; independent of the model."""
    t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = self.q_mean_variance(x_start, t)
    kl = normal_kl(mean, log_variance * jnp.ones_like(mean), 0.0, 0.0)
    return mean_flat(kl) / math.log(2.0)

  def training_losses(self, model_fn: ModelFn, x_start: Array, t: Array, noise: Array) -> Array:
    """The per-example training loss `[B]` for x_0 `[B, H, W, C]`, t `[B]`, noise like x_0."""
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, t)
    mean_output, var_output = self.split_output(model_output, x_t)
    if self.loss_type == "kl":
      return self._vb_from_output(mean_output, var_output, x_start, x_t, t)
    target = {
      "xprev": lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
      "xstart": lambda: x_start,
      "eps": lambda: noise,
    }[self.model_mean_type]()
    mse = mean_flat(jnp.square(target - mean_output))
    if self.loss_type == "mse":
      return mse
    # hybrid: the bound trains only the variance; T/1000 is lambda = 0.001 on L_vlb = T E_t L_t.
    frozen_mean = jax.lax.stop_gradient(mean_output)
    vb = self._vb_from_output(frozen_mean, var_output, x_start, x_t, t)
    return mse + vb * (self.num_timesteps / 1000.0)

  def _vb_from_output(self, mean_output, var_output, x_start, x_t, t) -> Array:
    variance, log_variance = self._variance(var_output, x_t, t)
    mean, _ = self._mean_from_output(mean_output, x_t, t, clip_denoised=False)
    out = dict(mean=mean, variance=variance, log_variance=log_variance)
    return self._vb_terms_from_p(out, x_start, x_t, t)

  def calc_bpd_loop(
    self, model_fn: ModelFn, x_start: Array, rng: Array, clip_denoised: bool = True
  ) -> dict[str, Array]:
    """The full variational bound of x_0 `[B, H, W, C]`, one fresh x_t ~ q(x_t | x_0) per t.

    Returns `total_bpd` `[B]`, `prior_bpd` `[B]`, `terms_bpd` `[B, T]` and `mse` `[B, T]` (the
    squared error of the predicted x_0 at each t).
    """

    def body(_, t):
      t_b = jnp.full((x_start.shape[0],), t, dtype=jnp.int32)
      noise = _normal(_fold_in(rng, t), x_start.shape, x_start.dtype)
      x_t = self.q_sample(x_start, t_b, noise)
      terms, pred_xstart = self.vb_terms_bpd(model_fn, x_start, x_t, t_b, clip_denoised)
      return None, (terms, mean_flat(jnp.square(pred_xstart - x_start)))

    timesteps = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (terms, mse) = jax.lax.scan(body, None, timesteps)
    terms_bpd = jnp.flip(terms, axis=0).T
    mse = jnp.flip(mse, axis=0).T
    prior = self.prior_bpd(x_start)
    return dict(
      total_bpd=jnp.sum(terms_bpd, axis=1) + prior,
      prior_bpd=prior,
      terms_bpd=terms_bpd,
      mse=mse,
    )


def create_diffusion(
  *,
  beta_schedule: str,
  beta_start: float,
  beta_end: float,
  num_timesteps: int,
  model_mean_type: str,
  model_var_type: str,
  loss_type: str,
) -> GaussianDiffusion:
  """Builds a `GaussianDiffusion` from the fields of `config.diffusion`."""
  betas = get_beta_schedule(
    beta_schedule, beta_start=beta_start, beta_end=beta_end, num_timesteps=num_timesteps
  )
  return GaussianDiffusion(
    betas=betas,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
    loss_type=loss_type,
  )
