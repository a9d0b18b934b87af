# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     name: quickstart.ipynb
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
# # ddpm_jax quickstart: train a DDPM on handwritten digits
#
# **In Colab:** File > Open notebook > GitHub, enter the repository that holds your copy of
# ddpm_jax and pick `notebooks/quickstart.ipynb` (or File > Upload notebook), then set `REPO_URL`
# in the first cell to that repository's git URL.
#
# This notebook trains the U-Net of *Denoising Diffusion Probabilistic Models* (Ho, Jain,
# Abbeel 2020) on the 1,797 real 8x8 digits that ship inside scikit-learn (nothing to
# download), then samples it with the paper's ancestral sampler (Algorithm 2) and with
# DDIM, and shows the progressive generation of Fig. 6. Every step calls the library that
# the command line uses: `train.train_and_evaluate(config, workdir)` is the whole of
# `python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR`.
#
# The full digits run (1.0M parameters, T = 1000, 2,000 steps) takes about 10 minutes on 2
# CPU cores, less on a Colab GPU runtime. Rerunning the training cell resumes from the latest
# checkpoint in `WORKDIR`.

# %% cell_id="params"
# Parameters. The test suite sets DDPM_NOTEBOOK_SMALL=1: tiny settings, nothing downloaded.
# In Colab leave it unset for the real run.
import os

SMALL = os.environ.get("DDPM_NOTEBOOK_SMALL") == "1"
REPO_URL = ""  # The git URL of your ddpm_jax repository; needed outside a checkout only.
WORKDIR = os.path.abspath("ddpm_quickstart")  # Checkpoints and samples; rerunning resumes.

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
import functools
import io

import IPython.display
import jax
import numpy as np
import tensorflow as tf
from PIL import Image

from configs import digits
from ddpm_jax import image_grid, model_bundle, parallel
from ddpm_jax.data.digits import load_digits_uint8
from ddpm_jax.runtime import xla_flags
from ddpm_jax.sampling import figures, samplers
from ddpm_jax.training import loop

xla_flags.apply()  # XLA:CPU's faster convolutions, as `ddpm_jax.main`: before JAX starts.
print(f"JAX {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} device(s)")


def show(image: np.ndarray, scale: int = 4) -> None:
  """Displays a uint8 image [H, W, C] (C = 1 or 3) as a PNG, enlarged by pixel repetition."""
  image = np.asarray(image).repeat(scale, axis=0).repeat(scale, axis=1)
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  IPython.display.display(IPython.display.Image(data=buffer.getvalue()))


# %% [markdown]
# ## The data
#
# `load_digits_uint8` returns scikit-learn's digits scaled from 0..16 to 0..255. The
# training job reads them through TensorFlow Datasets (the `ddpm_digits` builder prepares
# them offline into `config.data.data_dir`), as it reads CIFAR-10; the first 1,500 are
# the train split, the last 297 the test split. Pixels enter the model as x / 127.5 - 1,
# in [-1, 1].

# %% cell_id="data"
images, labels = load_digits_uint8()
print(f"digits {images.shape} {images.dtype}, labels {labels[:16]}")
show(image_grid.make_grid(images[:32], num_cols=16), scale=6)

# %% [markdown]
# ## The config
#
# `configs/digits.py` changes only what differs from `configs/default.py` (the paper's
# CIFAR-10 setting): the image size, a smaller U-Net (ch 32, ch_mult (1, 2), attention at
# 4x4), lr 1e-3 and an EMA decay of 0.995 for the short run. The diffusion is the paper's:
# linear betas from 1e-4 to 0.02 over T = 1000 steps, the network predicts the noise eps
# and is trained with L_simple (eq. 14). In the test suite (`SMALL`) the U-Net has one
# level, T = 20 and training stops after 4 steps: the samples are noise, but every step
# below runs.

# %% cell_id="config"
config = digits.get_config()
config.data.data_dir = os.path.join(WORKDIR, "tfds")  # Where TFDS prepares the digits.
if SMALL:
  config.model.ch_mult = (1,)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = 20
  config.optim.warmup_steps = 2
  config.training.batch_size = 16
  config.training.num_train_steps = 4
  config.training.log_every = 2
  config.training.checkpoint_every_steps = 0
  config.training.checkpoint_every_secs = 0
  config.training.sample_every = 0
  config.training.fid_num_samples = 0

m, d, t = config.model, config.diffusion, config.training
print(f"U-Net ch {m.ch}, ch_mult {tuple(m.ch_mult)}, attention at {tuple(m.attn_resolutions)}")
print(
  f"diffusion {d.beta_schedule} betas {d.beta_start}..{d.beta_end}, T = {d.num_timesteps}, "
  f"predicts {d.model_mean_type}, variance {d.model_var_type}, loss {d.loss_type}"
)
print(f"training {t.num_train_steps} steps of batch {t.batch_size}, lr {config.optim.lr}")

# %% [markdown]
# ## Training (Algorithm 1)
#
# Each step draws $t \sim \mathrm{Uniform}\{0, \dots, T-1\}$ and
# $\epsilon \sim \mathcal{N}(0, I)$ per image, forms
# $x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon$ (eq. 4) and takes an
# Adam step on $\lVert \epsilon - \epsilon_\theta(x_t, t) \rVert^2$ ($L_\text{simple}$, eq. 14),
# then updates the EMA of the parameters. The job writes `config.json`, Orbax checkpoints,
# TensorBoard events and (full run) a sample grid and the FID of 500 EMA samples into
# `WORKDIR`, and returns the final train state.

# %% cell_id="train"
state = loop.train_and_evaluate(config, WORKDIR)
print(f"trained to step {int(state.step)}; {parallel.param_count(state.params):,} parameters")


# %% [markdown]
# The job logs the mean training loss every `training.log_every` steps to TensorBoard
# (`%load_ext tensorboard`, then `%tensorboard --logdir {WORKDIR}`, shows every scalar). Here
# we read the loss back from the event files, then evaluate the EMA parameters on the 297 test
# digits at random $t$ and $\epsilon$. An untrained network predicts $\epsilon_\theta = 0$ (its
# last convolution starts near zero), which scores 1.0.


# %% cell_id="loss"
def logged_scalars(workdir: str, tag: str) -> list[tuple[int, float]]:
  """(step, value) of a scalar that the training job wrote to its TensorBoard events."""
  rows = []
  for path in tf.io.gfile.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      rows += [
        (event.step, float(tf.make_ndarray(v.tensor))) for v in event.summary.value if v.tag == tag
      ]
  return sorted(rows)


losses = logged_scalars(WORKDIR, "loss")
for step, value in losses[-10:]:
  print(f"step {step:5d}  loss {value:.4f}")
print(f"final loss {losses[-1][1]:.4f} (training batches, step {losses[-1][0]})")


diffusion = model_bundle.create_diffusion(config)
model = model_bundle.create_model(config)
ema_params = jax.device_get(state.ema_params)
image_shape = model_bundle.image_shape(config)


def model_fn(params):
  return lambda x, t: model.apply({"params": params}, x, t, train=False)


@jax.jit
def test_loss(params, x_start, rng):
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x_start.shape[0],), 0, diffusion.num_timesteps)
  noise = jax.random.normal(noise_rng, x_start.shape)
  return diffusion.training_losses(model_fn(params), x_start, t, noise).mean()


test_images = images[1500:].astype(np.float32) / 127.5 - 1.0
loss = float(test_loss(ema_params, test_images, jax.random.PRNGKey(0)))
print(f"test loss {loss:.4f} (EMA params, {len(test_images)} test digits)")

# %% [markdown]
# ## Sampling
#
# **Ancestral sampling** (Algorithm 2) runs all $T$ reverse steps from
# $x_T \sim \mathcal{N}(0, I)$: $x_{t-1} = \mu_\theta(x_t, t) + \sigma_t z$ with the mean of
# eq. 11 (computed through the predicted $x_0$, clipped to $[-1, 1]$ as in the original code)
# and $\sigma_t^2 = \beta_t$ (`fixedlarge`); the last step adds no noise. The loop is a
# `lax.fori_loop`, so `jax.jit` traces the U-Net once.

# %% cell_id="ancestral"
NUM_SAMPLES = 16 if SMALL else 64
shape = (NUM_SAMPLES, *image_shape)


@jax.jit
def ancestral_samples(params, rng):
  return diffusion.p_sample_loop(model_fn(params), shape, rng)


samples = np.asarray(ancestral_samples(ema_params, jax.random.PRNGKey(1)))
print(f"samples shape {samples.shape}, values in [{samples.min():.2f}, {samples.max():.2f}]")
show(image_grid.make_grid(image_grid.to_uint8(samples)), scale=6)

# %% [markdown]
# **DDIM** (Song et al. 2021) reuses the trained network on a strided subset of the
# timesteps; with $\eta = 0$ it is deterministic given $x_T$. The same `rng` draws the same
# $x_T$ as the ancestral sampler above, so the grids can be compared image by image.

# %% cell_id="ddim"
DDIM_STEPS = 10 if SMALL else 50


@functools.partial(jax.jit, static_argnames="num_steps")
def ddim_samples(params, rng, num_steps):
  return diffusion.ddim_sample_loop(model_fn(params), shape, rng, num_steps=num_steps, eta=0.0)


ddim = np.asarray(ddim_samples(ema_params, jax.random.PRNGKey(1), num_steps=DDIM_STEPS))
print(f"ddim samples shape {ddim.shape} ({DDIM_STEPS} steps, eta 0)")
show(image_grid.make_grid(image_grid.to_uint8(ddim)), scale=6)

# %% [markdown]
# ## Progressive generation (Fig. 6)
#
# At every reverse step the predicted noise also gives a prediction of the image,
# $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\, \epsilon_\theta(x_t, t)) / \sqrt{\bar\alpha_t}$
# (eq. 4 solved for $x_0$). Rows are samples; columns are $\hat x_0$ at evenly spaced $t$ from
# the noisiest to $t = 0$, then the sample: large-scale features appear first, details last.

# %% cell_id="progressive"
keys = samplers.sample_keys(jax.random.PRNGKey(2), 0, 8)  # One key per sample.
table = figures.progressive_generation(
  diffusion, model, ema_params, keys, image_shape, num_snapshots=10 if SMALL else 20
)
print(f"progressive table shape {table.shape}")
show(figures.tile(table), scale=6)

# %% [markdown]
# ## From the command line
#
# ```sh
# python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR               # train
# python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR --mode=sample \
#     --config.sample.sampler=ddim --config.sample.num_steps=50                 # samples
# python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR --mode=figures  # Figs. 6-9
# python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR --mode=eval     # bits/dim, FID
# ```
#
# `diffusion_explained.ipynb` walks through the math; `sample_official_weights.ipynb`
# samples the paper's CIFAR-10 and LSUN models.
