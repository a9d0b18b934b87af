# ---
# jupyter:
#   colab:
#     name: diffusion_explained.ipynb
#     provenance: []
#     toc_visible: true
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab,language_info
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # Diffusion explained: the math of DDPM on real digits
#
# **In Colab:** File > Open notebook > GitHub, enter the repository that holds your copy of
# ddpm_jax and pick `notebooks/diffusion_explained.ipynb` (or File > Upload notebook), then set
# `REPO_URL` in the first cell to that repository's git URL.
#
# A walk through *Denoising Diffusion Probabilistic Models* (Ho, Jain, Abbeel 2020) with
# the pure functions of `ddpm_jax.diffusion`: the forward process, the noise schedules,
# the two reverse variances, the variational bound in bits/dim, term by term, and the
# rate-distortion curve of the progressive code (Sec. 4.3). No network is trained: where
# the bound needs a denoiser we use the exact one for a Gaussian fitted to the digits.
# Equation numbers are the paper's.
#
# **Time.** The code indexes steps from 0 as the original TensorFlow code does: code step
# t is the paper's step t+1 and T = 1000 steps run t = 0..999.

# %% cell_id="params"
# Parameters. The test suite sets DDPM_NOTEBOOK_SMALL=1: tiny settings, nothing downloaded.
# In Colab leave it unset for the real run.
import os

SMALL = os.environ.get("DDPM_NOTEBOOK_SMALL") == "1"
REPO_URL = ""  # The git URL of your ddpm_jax repository; needed outside a checkout only.
WORKDIR = os.path.abspath("ddpm_explained")  # Checkpoints and samples; rerunning resumes.

# %% [markdown]
# ### Install
#
# The next cell makes `ddpm_jax` and the repository's `configs/` importable, `ddpm_jax` with its
# pinned stack (JAX 0.10.2, Flax 0.12.8, ...) and CUDA 12 wheels on a GPU runtime. Inside a
# checkout of the repository it uses that checkout (`pip install -e` on it if `ddpm_jax` is not
# installed yet); elsewhere (Colab) it clones `REPO_URL`, the git URL of your ddpm_jax repository
# that you set in the first cell, into `ddpm_jax_repo/` and installs that. If Colab asks to
# restart the runtime after the install, restart it and run the notebook again from the top.

# %% cell_id="install"
import importlib.util
import pathlib
import shutil
import subprocess
import sys


def find_checkout() -> pathlib.Path | None:
  """The ddpm_jax checkout holding the working directory (a parent with setup.py and ddpm_jax/)."""
  cwd = pathlib.Path.cwd()
  return next(
    (d for d in (cwd, *cwd.parents) if (d / "setup.py").is_file() and (d / "ddpm_jax").is_dir()),
    None,
  )


if importlib.util.find_spec("ddpm_jax") is None or importlib.util.find_spec("configs") is None:
  checkout = find_checkout()
  if checkout is None and REPO_URL:
    checkout = pathlib.Path("ddpm_jax_repo").absolute()  # configs/ is in the repository only.
    if not checkout.exists():
      subprocess.check_call(
        ["git", "clone", "--depth=1", REPO_URL.removeprefix("git+"), str(checkout)]
      )
  if checkout is None:
    raise ValueError(
      "ddpm_jax is not installed and this notebook is not inside a checkout of "
      "it: set REPO_URL in the first cell to the git URL of your ddpm_jax "
      "repository, then run the notebook again from the top."
    )
  if importlib.util.find_spec("ddpm_jax") is None:
    extra = "cuda12" if shutil.which("nvidia-smi") else "cpu"  # On a TPU runtime: "tpu".
    subprocess.check_call(
      [sys.executable, "-m", "pip", "install", "-q", "-e", f"{checkout}[{extra}]"]
    )
  sys.path.insert(0, str(checkout))  # configs/; pip's editable finder loads at start-up only.
  importlib.invalidate_caches()
print("ddpm_jax:", os.path.dirname(importlib.util.find_spec("ddpm_jax").origin))

# %% cell_id="imports"
import io

import IPython.display
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpm_jax import diffusion, image_grid
from ddpm_jax.data.digits import load_digits_uint8
from ddpm_jax.evaluation import rate_distortion

images, labels = load_digits_uint8()  # uint8 [1797, 8, 8, 1], 0..255.
data = images.astype(np.float32) / 127.5 - 1.0  # The model's scale, [-1, 1].
train_data, test_data = data[:1500], data[1500:]


def show(image: np.ndarray, scale: int = 4) -> None:
  """Displays a uint8 image [H, W, C] (C = 1 or 3) as a PNG, enlarged by pixel repetition."""
  image = np.asarray(image).repeat(scale, axis=0).repeat(scale, axis=1)
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  IPython.display.display(IPython.display.Image(data=buffer.getvalue()))


COLORS = [
  (31, 119, 180),
  (255, 127, 14),
  (44, 160, 44),
  (214, 39, 40),
  (148, 103, 189),
  (140, 86, 75),
  (227, 119, 194),
  (127, 127, 127),
]


def ticks(lo: float, hi: float, log: bool) -> np.ndarray:
  """Round tick positions in [lo, hi]: powers of 10 on a log axis, else multiples of 1, 2, 2.5
  or 5 times a power of 10 (positions are log10 values on a log axis)."""
  if log and hi - lo >= 1:
    return np.arange(np.ceil(lo), np.floor(hi) + 1)
  raw = (hi - lo) / 4
  step = next(
    m * 10 ** np.floor(np.log10(raw))
    for m in (1, 2, 2.5, 5, 10)
    if m * 10 ** np.floor(np.log10(raw)) >= raw
  )
  return np.arange(np.ceil(lo / step) * step, hi + 1e-9 * step, step)


def line_plot(
  curves: dict,
  *,
  title: str,
  xlabel: str,
  ylabel: str,
  log_x: bool = False,
  log_y: bool = False,
  size: tuple[int, int] = (640, 300),
) -> np.ndarray:
  """Draws {name: (x [N], y [N])} as lines with PIL, a legend on the right. uint8 [H, W, 3]."""
  width, height = size
  left, top, right, bottom = 70, 30, 150, 40
  tx = np.log10 if log_x else (lambda v: np.asarray(v, np.float64))
  ty = np.log10 if log_y else (lambda v: np.asarray(v, np.float64))
  xs = np.concatenate([tx(x) for x, _ in curves.values()])
  ys = np.concatenate([ty(y) for _, y in curves.values()])
  (x0, x1), (y0, y1) = (xs.min(), xs.max()), (ys.min(), ys.max())
  x1, y1 = max(x1, x0 + 1e-12), max(y1, y0 + 1e-12)
  px = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)
  py = lambda v: height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)
  image = Image.new("RGB", size, "white")
  draw, font = ImageDraw.Draw(image), ImageFont.load_default()
  draw.rectangle((left, top, width - right, height - bottom), outline="black")
  for v in ticks(x0, x1, log_x):
    draw.line((px(v), height - bottom, px(v), height - bottom + 4), fill="black")
    draw.text(
      (px(v), height - bottom + 6),
      f"{10**v if log_x else v:.3g}",
      fill="black",
      font=font,
      anchor="ma",
    )
  for v in ticks(y0, y1, log_y):
    draw.line((left - 4, py(v), left, py(v)), fill="black")
    draw.text(
      (left - 6, py(v)), f"{10**v if log_y else v:.3g}", fill="black", font=font, anchor="rm"
    )
  for i, (name, (x, y)) in enumerate(curves.items()):
    color, legend_y = COLORS[i % len(COLORS)], top + 8 + 16 * i
    draw.line(list(zip(px(tx(x)), py(ty(y)), strict=True)), fill=color, width=2)
    draw.line((width - right + 10, legend_y, width - right + 30, legend_y), fill=color, width=3)
    draw.text((width - right + 36, legend_y), name, fill="black", font=font, anchor="lm")
  draw.text((width / 2, 8), title, fill="black", font=font, anchor="ma")
  draw.text(((left + width - right) / 2, height - 16), xlabel, fill="black", font=font, anchor="ma")
  draw.text((4, 8), ylabel, fill="black", font=font)
  return np.asarray(image)


# %% [markdown]
# ## 1. The forward process $q$
#
# The forward process adds Gaussian noise in $T$ small steps of variance $\beta_t$ (eq. 2):
# $$q(x_t \mid x_{t-1}) = \mathcal{N}\big(x_t;\ \sqrt{1 - \beta_t}\, x_{t-1},\ \beta_t I\big).$$
# Composed, the steps give $x_t$ in closed form from $x_0$ (eq. 4), with
# $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t} \alpha_s$:
# $$q(x_t \mid x_0) = \mathcal{N}\big(x_t;\ \sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I\big),
# \qquad x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon,\quad
# \epsilon \sim \mathcal{N}(0, I).$$
# `GaussianDiffusion` holds these tables in float64 (`alphas_cumprod` is $\bar\alpha$) and
# `q_sample` draws $x_t$. Below, one test digit at increasing $t$, all with the same
# $\epsilon$.

# %% cell_id="forward"
T = 1000
betas = diffusion.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T)
gd = diffusion.GaussianDiffusion(betas, model_mean_type="eps", model_var_type="fixedlarge")

steps = np.array([0, 50, 100, 200, 300, 400, 600, 999])
x_start = np.repeat(test_data[:1], len(steps), axis=0)
eps = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 1))).repeat(len(steps), 0)
x_t = gd.q_sample(x_start, jnp.asarray(steps), eps)
for t in steps:
  print(
    f"t = {t:3d}: sqrt(abar_t) = {np.sqrt(gd.alphas_cumprod[t]):.4f}, "
    f"sqrt(1 - abar_t) = {np.sqrt(1 - gd.alphas_cumprod[t]):.4f}"
  )
show(image_grid.make_grid(image_grid.to_uint8(x_t), num_cols=len(steps)), scale=8)

# %% [markdown]
# Eq. 4 is the $T$-step Markov chain of eq. 2 in one jump. A check by simulation: run 100,000
# scalar chains from $x_0 = 0.8$ through eq. 2 step by step, and compare the mean and standard
# deviation of $x_t$ with $\sqrt{\bar\alpha_t}\, x_0$ and $\sqrt{1 - \bar\alpha_t}$.

# %% cell_id="markov"
rng = np.random.default_rng(0)
x = np.full(100_000, 0.8)
for t in range(T):
  x = np.sqrt(1 - betas[t]) * x + np.sqrt(betas[t]) * rng.standard_normal(x.shape)
  if t in (99, 499, 999):
    abar = gd.alphas_cumprod[t]
    print(
      f"t = {t:3d}: mean {x.mean():+.4f} vs {np.sqrt(abar) * 0.8:+.4f}, "
      f"std {x.std():.4f} vs {np.sqrt(1 - abar):.4f}"
    )

# %% [markdown]
# ## 2. Noise schedules
#
# The paper uses `linear` betas from $\beta_1 = 10^{-4}$ to $\beta_T = 0.02$ (Sec. 4): small
# against the data scale $[-1, 1]$, so that each reverse step is nearly Gaussian, and large
# enough overall that $x_T$ keeps almost no signal: $\bar\alpha_T = 4.0358 \cdot 10^{-5}$, so
# $L_T = D_\text{KL}(q(x_T \mid x_0) \,\|\, \mathcal{N}(0, I))$ is about $10^{-5}$ bits/dim.
# The original code also offers `quad`, `const`, `warmup10`, `warmup50` and `jsd`
# ($1/T, 1/(T-1), \dots, 1$); `cosine` is the schedule of Nichol & Dhariwal (2021), which
# destroys information more slowly at the start.

# %% cell_id="schedules"
abars = {}
print(
  f"{'schedule':>9} {'beta_0':>10} {'beta_999':>10} {'abar_249':>10} {'abar_499':>10} "
  f"{'abar_749':>10} {'abar_999':>10}"
)
for name in diffusion.BETA_SCHEDULES:
  b = diffusion.get_beta_schedule(name, beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  abars[name] = np.cumprod(1.0 - b)
  a = abars[name]
  print(
    f"{name:>9} {b[0]:10.4e} {b[-1]:10.4e} {a[249]:10.4e} {a[499]:10.4e} {a[749]:10.4e} "
    f"{a[999]:10.4e}"
  )
print(f"linear: abar_999 = {abars['linear'][999]:.4e}")
t_axis = np.arange(T)
show(
  line_plot(
    {k: (t_axis, v) for k, v in abars.items()},
    title="abar_t by schedule",
    xlabel="t",
    ylabel="abar_t",
  ),
  scale=1,
)

# %% [markdown]
# ## 3. The posterior and the two reverse variances
#
# Given $x_0$, the forward process can be reversed exactly (eqs. 6-7):
# $$q(x_{t-1} \mid x_t, x_0) = \mathcal{N}\big(x_{t-1};\ \tilde\mu_t(x_t, x_0),\
# \tilde\beta_t I\big),\qquad
# \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t}\, x_0
# + \frac{\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t}\, x_t,\qquad
# \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\, \beta_t.$$
# The reverse process $p_\theta(x_{t-1} \mid x_t) = \mathcal{N}(\mu_\theta(x_t, t),
# \sigma_t^2 I)$ (eq. 1) learns the mean. Sec. 3.2 fixes $\sigma_t^2 = \beta_t$ (`fixedlarge`,
# optimal for $x_0 \sim \mathcal{N}(0, I)$) or $\sigma_t^2 = \tilde\beta_t$ (`fixedsmall`,
# optimal for $x_0$ a single point): the upper and lower bounds on the reverse process
# entropy, with similar sample quality. They differ only over the first steps:
# $\tilde\beta$ is 0 at code step 0 (the last reverse step adds no noise), so its log is
# clipped there to $\log \tilde\beta_1 = \log(5.4532 \cdot 10^{-5}) = -9.81673$.

# %% cell_id="posterior"
print(f"{'t':>4} {'beta_t':>11} {'beta~_t':>11} {'beta~/beta':>10}")
for t in (0, 1, 2, 5, 10, 50, 100, 500, 999):
  print(
    f"{t:4d} {gd.betas[t]:11.4e} {gd.posterior_variance[t]:11.4e} "
    f"{gd.posterior_variance[t] / gd.betas[t]:10.4f}"
  )
print(
  f"beta~_1 = {gd.posterior_variance[1]:.4e}, "
  f"posterior_log_variance_clipped[0] = {gd.posterior_log_variance_clipped[0]:.5f}"
)
t_axis = np.arange(1, T)
variances = {"beta_t": (t_axis, gd.betas[1:]), "beta~_t": (t_axis, gd.posterior_variance[1:])}
show(
  line_plot(
    variances,
    title="the two reverse variances",
    xlabel="t",
    ylabel="variance",
    log_x=True,
    log_y=True,
  ),
  scale=1,
)

# %% [markdown]
# ## 4. A denoiser in closed form
#
# The network predicts the noise, and the reverse mean follows from it (eq. 11):
# $$\mu_\theta(x_t, t) = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1 -
# \bar\alpha_t}}\, \epsilon_\theta(x_t, t)\Big).$$
# Training on $L_\text{simple}$ (eq. 14) drives $\epsilon_\theta(x_t, t)$ towards
# $\mathbb{E}[\epsilon \mid x_t]$, which has a closed form for Gaussian data. Fit
# $x_0 \sim \mathcal{N}(m, S)$ to the 1,500 training digits (64 dimensions) and write
# $S = U \operatorname{diag}(\lambda) U^\top$. In the eigenbasis the coordinates are
# independent, and
# $$\mathbb{E}[x_0 \mid x_t] = m + U \operatorname{diag}\Big(\frac{\lambda
# \sqrt{\bar\alpha_t}}{\bar\alpha_t \lambda + 1 - \bar\alpha_t}\Big) U^\top
# (x_t - \sqrt{\bar\alpha_t}\, m),\qquad
# \mathbb{E}[\epsilon \mid x_t] = \frac{x_t - \sqrt{\bar\alpha_t}\, \mathbb{E}[x_0 \mid
# x_t]}{\sqrt{1 - \bar\alpha_t}}.$$
# `gaussian_eps(x_t, t)` is a model like the U-Net: any `model_fn(x [B, H, W, C], t [B])`
# works with every function of `GaussianDiffusion`. Its samples are what a perfect network
# would draw if the digits were Gaussian: digit-like blurs.

# %% cell_id="gaussian"
flat = train_data.reshape(len(train_data), -1).astype(np.float64)
mean = flat.mean(axis=0)
lam, eigvecs = np.linalg.eigh(np.cov(flat, rowvar=False) + 1e-4 * np.eye(flat.shape[1]))
mean, lam, eigvecs = (jnp.asarray(v, jnp.float32) for v in (mean, lam, eigvecs))
abar_table = jnp.asarray(gd.alphas_cumprod, jnp.float32)


def gaussian_eps(x_t, t):
  """E[eps | x_t] for x_0 ~ N(mean, cov): x_t [B, 8, 8, 1], t int [B]."""
  abar = abar_table[t][:, None]
  x = x_t.reshape(x_t.shape[0], -1)
  z = (x - jnp.sqrt(abar) * mean) @ eigvecs
  x0_pred = mean + (lam * jnp.sqrt(abar) / (abar * lam + 1.0 - abar) * z) @ eigvecs.T
  return ((x - jnp.sqrt(abar) * x0_pred) / jnp.sqrt(1.0 - abar)).reshape(x_t.shape)


print(f"the 3 largest of the 64 variances: {np.asarray(lam[-3:])}")
NUM_SAMPLES = 16 if SMALL else 64
samples = jax.jit(lambda rng: gd.p_sample_loop(gaussian_eps, (NUM_SAMPLES, 8, 8, 1), rng))(
  jax.random.PRNGKey(1)
)
print(f"samples shape {samples.shape}")
show(image_grid.make_grid(image_grid.to_uint8(samples)), scale=6)

# %% [markdown]
# ## 5. The variational bound, term by term
#
# Training minimises a bound on the negative log likelihood (eqs. 3 and 5):
# $$L = \underbrace{D_\text{KL}(q(x_T \mid x_0) \,\|\, p(x_T))}_{L_T}
# + \sum_{t > 1} \underbrace{D_\text{KL}(q(x_{t-1} \mid x_t, x_0) \,\|\,
# p_\theta(x_{t-1} \mid x_t))}_{L_{t-1}}
# \underbrace{- \log p_\theta(x_0 \mid x_1)}_{L_0}.$$
# $L_T$ (the prior term) has no parameters; each $L_{t-1}$ is a KL between Gaussians (eq. 12
# for the $\epsilon$ parametrisation); $L_0$ is the discretised Gaussian decoder over the 256
# pixel values (eq. 13). `calc_bpd_loop` evaluates every term on a fresh
# $x_t \sim q(x_t \mid x_0)$, in bits per dimension (nats / (64 ln 2) here), for both
# variance choices. In code steps, term $t = 0$ is the decoder $L_0$ and term $t \ge 1$ is
# the paper's $L_t$.

# %% cell_id="bpd"
NUM_BPD = 16 if SMALL else len(test_data)
x_eval = test_data[:NUM_BPD]
bounds = {}
for var_type in ("fixedlarge", "fixedsmall"):
  d = diffusion.GaussianDiffusion(betas, model_mean_type="eps", model_var_type=var_type)
  out = jax.jit(lambda x, rng, d=d: d.calc_bpd_loop(gaussian_eps, x, rng))(
    x_eval, jax.random.PRNGKey(2)
  )
  bounds[var_type] = out = jax.tree.map(np.asarray, out)
  terms = out["terms_bpd"].mean(axis=0)
  print(
    f"{var_type}: total {out['total_bpd'].mean():.4f} bits/dim = prior "
    f"{out['prior_bpd'].mean():.2e} + L_1..L_999 {terms[1:].sum():.4f} + "
    f"decoder L_0 {terms[0]:.4f} ({NUM_BPD} test digits)"
  )
t_axis = np.arange(1, T)
show(
  line_plot(
    {k: (t_axis, v["terms_bpd"].mean(axis=0)[1:]) for k, v in bounds.items()},
    title="the bound's terms L_t",
    xlabel="t",
    ylabel="bits/dim",
    log_x=True,
    log_y=True,
  ),
  scale=1,
)

# %% [markdown]
# ## 6. Rate and distortion (Sec. 4.3, Table 4, Fig. 5)
#
# The bound is also the length of a progressive code: the sender transmits $x_T$, then
# $x_{T-1}, \dots$, each $x_{t-1}$ given $x_t$ at the cost of $L_{t-1}$ bits (Algorithms 3-4).
# After $k$ reverse steps the receiver has paid the *rate*, $L_T$ plus the terms received, and
# its best guess of the image is the $\hat x_0$ predicted from $x_t$; the *distortion* is that
# guess's RMSE on the 0..255 scale. On CIFAR-10 the paper finds that most of the bits go to
# imperceptible details: the rate ends at 1.78 bits/dim while the decoder's $L_0$ adds 1.97
# (RMSE 0.95). `rate_distortion.rate_distortion` turns `calc_bpd_loop`'s outputs into the
# curve; `render_plot` draws Fig. 5.

# %% cell_id="rd"
out = bounds["fixedlarge"]
curve = rate_distortion.rate_distortion(out["terms_bpd"], out["mse"], out["prior_bpd"])
print(f"{'reverse step':>12} {'rate (bits/dim)':>16} {'distortion (RMSE)':>18}")
for k, rate, dist in curve.table():
  print(f"{k:12d} {rate:16.5f} {dist:18.5f}")
decoder = out["terms_bpd"][:, 0].mean()
print(
  f"rate at T {curve.rate[-1]:.4f} + decoder {decoder:.4f} = total "
  f"{out['total_bpd'].mean():.4f} bits/dim"
)
show(rate_distortion.render_plot(curve.rate, curve.distortion), scale=1)

# %% [markdown]
# ## Where next
#
# `quickstart.ipynb` replaces the closed-form denoiser with a trained U-Net;
# `python -m ddpm_jax.main --mode=eval` computes these bits/dim and the rate-distortion
# table for a checkpoint over a whole eval split.
