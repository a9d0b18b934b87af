"""Builds the Colab notebooks in this folder from the cell lists below, to keep them reviewable.

  python notebooks/_build.py           # (re)writes notebooks/*.ipynb, without outputs
  python notebooks/_build.py --check   # exits 1 when a notebook differs from what this file builds

Edit the cells here, never the .ipynb files. Each notebook runs top to bottom in Colab; with
DDPM_NOTEBOOK_SMALL=1 it picks tiny settings (and no download), which is how
tests/test_notebooks.py executes it and checks its outputs. Cell ids are stable: the test finds
the cells it checks by id.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))
COLAB_URL = "https://colab.research.google.com/github/<org>/ddpm_jax/blob/main/notebooks"


def md(cell_id: str, text: str):
  return v4.new_markdown_cell(textwrap.dedent(text).strip(), id=cell_id)


def code(cell_id: str, *parts: str):
  """A code cell of `parts` (each dedented), separated by two blank lines."""
  return v4.new_code_cell("\n\n\n".join(textwrap.dedent(p).strip() for p in parts), id=cell_id)


def badge(name: str) -> str:
  return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
          f"({COLAB_URL}/{name}.ipynb)")


def params_cell(workdir: str, before: str = "") -> dict:
  """The first cell: SMALL (test mode), REPO_URL, the notebook's own parameters `before`, and
  WORKDIR (`workdir`, a Python expression)."""
  lines = [
      "# Parameters. The test suite sets DDPM_NOTEBOOK_SMALL=1: tiny settings, nothing downloaded.",
      "# In Colab leave it unset for the real run.",
      "import os",
      "",
      'SMALL = os.environ.get("DDPM_NOTEBOOK_SMALL") == "1"',
      'REPO_URL = "https://github.com/<org>/ddpm_jax"  # Placeholder: where ddpm_jax is published.',
      *textwrap.dedent(before).strip().splitlines(),
      f"WORKDIR = os.path.abspath({workdir})  # Checkpoints and samples; rerunning resumes.",
  ]
  return v4.new_code_cell("\n".join(lines), id="params")


INSTALL_MD = """
    ### Install

    The next cell installs `ddpm_jax` with its pinned stack (JAX 0.10.2, Flax 0.12.8, ...) from
    `REPO_URL`, with CUDA 12 wheels on a GPU runtime, unless `ddpm_jax` is already importable (a
    checkout installed with `pip install -e .`, or a second run). If Colab asks to restart the
    runtime after the install, restart it and run the notebook again from the top.
    """

INSTALL = """
    import importlib.util
    import shutil
    import subprocess
    import sys

    if importlib.util.find_spec("ddpm_jax") is None:
      extra = "cuda12" if shutil.which("nvidia-smi") else "cpu"  # On a TPU runtime: "tpu".
      subprocess.check_call(
          [sys.executable, "-m", "pip", "install", "-q", f"ddpm_jax[{extra}] @ git+{REPO_URL}"])
      importlib.invalidate_caches()
    print("ddpm_jax:", os.path.dirname(importlib.util.find_spec("ddpm_jax").origin))
    """

SHOW = '''
    def show(image: np.ndarray, scale: int = 4) -> None:
      """Displays a uint8 image [H, W, C] (C = 1 or 3) as a PNG, enlarged by pixel repetition."""
      image = np.asarray(image).repeat(scale, axis=0).repeat(scale, axis=1)
      buffer = io.BytesIO()
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
      IPython.display.display(IPython.display.Image(data=buffer.getvalue()))
    '''


# ----------------------------------------------------------------------------------------------
# quickstart.ipynb


def quickstart() -> list:
  return [
    md("title", f"""
    # ddpm_jax quickstart: train a DDPM on handwritten digits

    {badge("quickstart")}

    This notebook trains the U-Net of *Denoising Diffusion Probabilistic Models* (Ho, Jain,
    Abbeel 2020) on the 1,797 real 8x8 digits that ship inside scikit-learn (nothing to
    download), then samples it with the paper's ancestral sampler (Algorithm 2) and with
    DDIM, and shows the progressive generation of Fig. 6. Every step calls the library that
    the command line uses: `train.train_and_evaluate(config, workdir)` is the whole of
    `python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR`.

    The full digits run (1.0M parameters, T = 1000, 2,000 steps) takes about 10 minutes on 2
    CPU cores, less on a Colab GPU runtime. Rerunning the training cell resumes from the latest
    checkpoint in `WORKDIR`.
    """),
    params_cell('"ddpm_quickstart"'),
    md("install_md", INSTALL_MD),
    code("install", INSTALL),
    code("imports", """
    import functools
    import io

    import IPython.display
    import jax
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from configs import digits
    from ddpm_jax import factories, figures, image_grid, sampling, train, train_step, xla_flags
    from ddpm_jax.datasets.digits import load_digits_uint8

    xla_flags.apply()  # XLA:CPU's faster convolutions, as `ddpm_jax.main`: before JAX starts.
    print(f"JAX {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} device(s)")
    """, SHOW),
    md("data_md", """
    ## The data

    `load_digits_uint8` returns scikit-learn's digits scaled from 0..16 to 0..255. The
    training job reads them through TensorFlow Datasets (the `ddpm_digits` builder prepares
    them offline into `config.data.data_dir`), as it reads CIFAR-10; the first 1,500 are
    the train split, the last 297 the test split. Pixels enter the model as x / 127.5 - 1,
    in [-1, 1].
    """),
    code("data", """
    images, labels = load_digits_uint8()
    print(f"digits {images.shape} {images.dtype}, labels {labels[:16]}")
    show(image_grid.make_grid(images[:32], num_cols=16), scale=6)
    """),
    md("config_md", """
    ## The config

    `configs/digits.py` changes only what differs from `configs/default.py` (the paper's
    CIFAR-10 setting): the image size, a smaller U-Net (ch 32, ch_mult (1, 2), attention at
    4x4), lr 1e-3 and an EMA decay of 0.995 for the short run. The diffusion is the paper's:
    linear betas from 1e-4 to 0.02 over T = 1000 steps, the network predicts the noise eps
    and is trained with L_simple (eq. 14). In the test suite (`SMALL`) the U-Net has one
    level, T = 20 and training stops after 4 steps: the samples are noise, but every step
    below runs.
    """),
    code("config", """
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
    print(f"diffusion {d.beta_schedule} betas {d.beta_start}..{d.beta_end}, T = {d.num_timesteps}, "
          f"predicts {d.model_mean_type}, variance {d.model_var_type}, loss {d.loss_type}")
    print(f"training {t.num_train_steps} steps of batch {t.batch_size}, lr {config.optim.lr}")
    """),
    md("train_md", r"""
    ## Training (Algorithm 1)

    Each step draws $t \sim \mathrm{Uniform}\{0, \dots, T-1\}$ and
    $\epsilon \sim \mathcal{N}(0, I)$ per image, forms
    $x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon$ (eq. 4) and takes an
    Adam step on $\lVert \epsilon - \epsilon_\theta(x_t, t) \rVert^2$ ($L_\text{simple}$, eq. 14),
    then updates the EMA of the parameters. The job writes `config.json`, Orbax checkpoints,
    TensorBoard events and (full run) a sample grid and the FID of 500 EMA samples into
    `WORKDIR`, and returns the final train state.
    """),
    code("train", """
    state = train.train_and_evaluate(config, WORKDIR)
    print(f"trained to step {int(state.step)}; "
          f"{train_step.param_count(state.params):,} parameters")
    """),
    md("loss_md", r"""
    The job logs the mean training loss every `training.log_every` steps to TensorBoard
    (`%load_ext tensorboard`, then `%tensorboard --logdir {WORKDIR}`, shows every scalar). Here
    we read the loss back from the event files, then evaluate the EMA parameters on the 297 test
    digits at random $t$ and $\epsilon$. An untrained network predicts $\epsilon_\theta = 0$ (its
    last convolution starts near zero), which scores 1.0.
    """),
    code("loss", '''
    def logged_scalars(workdir: str, tag: str) -> list[tuple[int, float]]:
      """(step, value) of a scalar that the training job wrote to its TensorBoard events."""
      rows = []
      for path in tf.io.gfile.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
          event = tf.compat.v1.Event.FromString(record.numpy())
          rows += [(event.step, float(tf.make_ndarray(v.tensor)))
                   for v in event.summary.value if v.tag == tag]
      return sorted(rows)


    losses = logged_scalars(WORKDIR, "loss")
    for step, value in losses[-10:]:
      print(f"step {step:5d}  loss {value:.4f}")
    print(f"final loss {losses[-1][1]:.4f} (training batches, step {losses[-1][0]})")
    ''', """
    diffusion = factories.create_diffusion(config)
    model = factories.create_model(config)
    ema_params = jax.device_get(state.ema_params)
    image_shape = factories.image_shape(config)


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
    """),
    md("ancestral_md", r"""
    ## Sampling

    **Ancestral sampling** (Algorithm 2) runs all $T$ reverse steps from
    $x_T \sim \mathcal{N}(0, I)$: $x_{t-1} = \mu_\theta(x_t, t) + \sigma_t z$ with the mean of
    eq. 11 (computed through the predicted $x_0$, clipped to $[-1, 1]$ as in the original code)
    and $\sigma_t^2 = \beta_t$ (`fixedlarge`); the last step adds no noise. The loop is a
    `lax.fori_loop`, so `jax.jit` traces the U-Net once.
    """),
    code("ancestral", """
    NUM_SAMPLES = 16 if SMALL else 64
    shape = (NUM_SAMPLES, *image_shape)


    @jax.jit
    def ancestral_samples(params, rng):
      return diffusion.p_sample_loop(model_fn(params), shape, rng)


    samples = np.asarray(ancestral_samples(ema_params, jax.random.PRNGKey(1)))
    print(f"samples shape {samples.shape}, values in [{samples.min():.2f}, {samples.max():.2f}]")
    show(image_grid.make_grid(image_grid.to_uint8(samples)), scale=6)
    """),
    md("ddim_md", r"""
    **DDIM** (Song et al. 2021) reuses the trained network on a strided subset of the
    timesteps; with $\eta = 0$ it is deterministic given $x_T$. The same `rng` draws the same
    $x_T$ as the ancestral sampler above, so the grids can be compared image by image.
    """),
    code("ddim", """
    DDIM_STEPS = 10 if SMALL else 50


    @functools.partial(jax.jit, static_argnames="num_steps")
    def ddim_samples(params, rng, num_steps):
      return diffusion.ddim_sample_loop(model_fn(params), shape, rng, num_steps=num_steps, eta=0.0)


    ddim = np.asarray(ddim_samples(ema_params, jax.random.PRNGKey(1), num_steps=DDIM_STEPS))
    print(f"ddim samples shape {ddim.shape} ({DDIM_STEPS} steps, eta 0)")
    show(image_grid.make_grid(image_grid.to_uint8(ddim)), scale=6)
    """),
    md("progressive_md", r"""
    ## Progressive generation (Fig. 6)

    At every reverse step the predicted noise also gives a prediction of the image,
    $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\, \epsilon_\theta(x_t, t)) / \sqrt{\bar\alpha_t}$
    (eq. 4 solved for $x_0$). Rows are samples; columns are $\hat x_0$ at evenly spaced $t$ from
    the noisiest to $t = 0$, then the sample: large-scale features appear first, details last.
    """),
    code("progressive", """
    keys = sampling.sample_keys(jax.random.PRNGKey(2), 0, 8)  # One key per sample.
    table = figures.progressive_generation(
        diffusion, model, ema_params, keys, image_shape, num_snapshots=10 if SMALL else 20)
    print(f"progressive table shape {table.shape}")
    show(figures.tile(table), scale=6)
    """),
    md("next_md", """
    ## From the command line

    ```sh
    python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR               # train
    python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR --mode=sample \\
        --config.sample.sampler=ddim --config.sample.num_steps=50                 # samples
    python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR --mode=figures  # Figs. 6-9
    python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR --mode=eval     # bits/dim, FID
    ```

    `diffusion_explained.ipynb` walks through the math; `sample_official_weights.ipynb`
    samples the paper's CIFAR-10 and LSUN models.
    """),
  ]


# ----------------------------------------------------------------------------------------------
# diffusion_explained.ipynb

LINE_PLOT = '''
    COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
              (140, 86, 75), (227, 119, 194), (127, 127, 127)]


    def ticks(lo: float, hi: float, log: bool) -> np.ndarray:
      """Round tick positions in [lo, hi]: powers of 10 on a log axis, else multiples of 1, 2, 2.5
      or 5 times a power of 10 (positions are log10 values on a log axis)."""
      if log and hi - lo >= 1:
        return np.arange(np.ceil(lo), np.floor(hi) + 1)
      raw = (hi - lo) / 4
      step = next(m * 10 ** np.floor(np.log10(raw)) for m in (1, 2, 2.5, 5, 10)
                  if m * 10 ** np.floor(np.log10(raw)) >= raw)
      return np.arange(np.ceil(lo / step) * step, hi + 1e-9 * step, step)


    def line_plot(curves: dict, *, title: str, xlabel: str, ylabel: str, log_x: bool = False,
                  log_y: bool = False, size: tuple[int, int] = (640, 300)) -> np.ndarray:
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
        draw.text((px(v), height - bottom + 6), f"{10**v if log_x else v:.3g}", fill="black",
                  font=font, anchor="ma")
      for v in ticks(y0, y1, log_y):
        draw.line((left - 4, py(v), left, py(v)), fill="black")
        draw.text((left - 6, py(v)), f"{10**v if log_y else v:.3g}", fill="black", font=font,
                  anchor="rm")
      for i, (name, (x, y)) in enumerate(curves.items()):
        color, legend_y = COLORS[i % len(COLORS)], top + 8 + 16 * i
        draw.line(list(zip(px(tx(x)), py(ty(y)), strict=True)), fill=color, width=2)
        draw.line((width - right + 10, legend_y, width - right + 30, legend_y), fill=color, width=3)
        draw.text((width - right + 36, legend_y), name, fill="black", font=font, anchor="lm")
      draw.text((width / 2, 8), title, fill="black", font=font, anchor="ma")
      draw.text(((left + width - right) / 2, height - 16), xlabel, fill="black", font=font,
                anchor="ma")
      draw.text((4, 8), ylabel, fill="black", font=font)
      return np.asarray(image)
    '''


def diffusion_explained() -> list:
  return [
    md("title", f"""
    # Diffusion explained: the math of DDPM on real digits

    {badge("diffusion_explained")}

    A walk through *Denoising Diffusion Probabilistic Models* (Ho, Jain, Abbeel 2020) with
    the pure functions of `ddpm_jax.diffusion`: the forward process, the noise schedules,
    the two reverse variances, the variational bound in bits/dim, term by term, and the
    rate-distortion curve of the progressive code (Sec. 4.3). No network is trained: where
    the bound needs a denoiser we use the exact one for a Gaussian fitted to the digits.
    Equation numbers are the paper's.

    **Time.** The code indexes steps from 0 as the original TensorFlow code does: code step
    t is the paper's step t+1 and T = 1000 steps run t = 0..999.
    """),
    params_cell('"ddpm_explained"'),
    md("install_md", INSTALL_MD),
    code("install", INSTALL),
    code("imports", """
    import io

    import IPython.display
    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from ddpm_jax import diffusion, image_grid, rate_distortion
    from ddpm_jax.datasets.digits import load_digits_uint8

    images, labels = load_digits_uint8()  # uint8 [1797, 8, 8, 1], 0..255.
    data = images.astype(np.float32) / 127.5 - 1.0  # The model's scale, [-1, 1].
    train_data, test_data = data[:1500], data[1500:]
    """, SHOW, LINE_PLOT),
    md("forward_md", r"""
    ## 1. The forward process $q$

    The forward process adds Gaussian noise in $T$ small steps of variance $\beta_t$ (eq. 2):
    $$q(x_t \mid x_{t-1}) = \mathcal{N}\big(x_t;\ \sqrt{1 - \beta_t}\, x_{t-1},\ \beta_t I\big).$$
    Composed, the steps give $x_t$ in closed form from $x_0$ (eq. 4), with
    $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t} \alpha_s$:
    $$q(x_t \mid x_0) = \mathcal{N}\big(x_t;\ \sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I\big),
    \qquad x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon,\quad
    \epsilon \sim \mathcal{N}(0, I).$$
    `GaussianDiffusion` holds these tables in float64 (`alphas_cumprod` is $\bar\alpha$) and
    `q_sample` draws $x_t$. Below, one test digit at increasing $t$, all with the same
    $\epsilon$.
    """),
    code("forward", """
    T = 1000
    betas = diffusion.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T)
    gd = diffusion.GaussianDiffusion(betas, model_mean_type="eps", model_var_type="fixedlarge")

    steps = np.array([0, 50, 100, 200, 300, 400, 600, 999])
    x_start = np.repeat(test_data[:1], len(steps), axis=0)
    eps = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 1))).repeat(len(steps), 0)
    x_t = gd.q_sample(x_start, jnp.asarray(steps), eps)
    for t in steps:
      print(f"t = {t:3d}: sqrt(abar_t) = {np.sqrt(gd.alphas_cumprod[t]):.4f}, "
            f"sqrt(1 - abar_t) = {np.sqrt(1 - gd.alphas_cumprod[t]):.4f}")
    show(image_grid.make_grid(image_grid.to_uint8(x_t), num_cols=len(steps)), scale=8)
    """),
    md("markov_md", r"""
    Eq. 4 is the $T$-step Markov chain of eq. 2 in one jump. A check by simulation: run 100,000
    scalar chains from $x_0 = 0.8$ through eq. 2 step by step, and compare the mean and standard
    deviation of $x_t$ with $\sqrt{\bar\alpha_t}\, x_0$ and $\sqrt{1 - \bar\alpha_t}$.
    """),
    code("markov", """
    rng = np.random.default_rng(0)
    x = np.full(100_000, 0.8)
    for t in range(T):
      x = np.sqrt(1 - betas[t]) * x + np.sqrt(betas[t]) * rng.standard_normal(x.shape)
      if t in (99, 499, 999):
        abar = gd.alphas_cumprod[t]
        print(f"t = {t:3d}: mean {x.mean():+.4f} vs {np.sqrt(abar) * 0.8:+.4f}, "
              f"std {x.std():.4f} vs {np.sqrt(1 - abar):.4f}")
    """),
    md("schedules_md", r"""
    ## 2. Noise schedules

    The paper uses `linear` betas from $\beta_1 = 10^{-4}$ to $\beta_T = 0.02$ (Sec. 4): small
    against the data scale $[-1, 1]$, so that each reverse step is nearly Gaussian, and large
    enough overall that $x_T$ keeps almost no signal: $\bar\alpha_T = 4.0358 \cdot 10^{-5}$, so
    $L_T = D_\text{KL}(q(x_T \mid x_0) \,\|\, \mathcal{N}(0, I))$ is about $10^{-5}$ bits/dim.
    The original code also offers `quad`, `const`, `warmup10`, `warmup50` and `jsd`
    ($1/T, 1/(T-1), \dots, 1$); `cosine` is the schedule of Nichol & Dhariwal (2021), which
    destroys information more slowly at the start.
    """),
    code("schedules", """
    abars = {}
    print(f"{'schedule':>9} {'beta_0':>10} {'beta_999':>10} {'abar_249':>10} {'abar_499':>10} "
          f"{'abar_749':>10} {'abar_999':>10}")
    for name in diffusion.BETA_SCHEDULES:
      b = diffusion.get_beta_schedule(name, beta_start=1e-4, beta_end=0.02, num_timesteps=T)
      abars[name] = np.cumprod(1.0 - b)
      a = abars[name]
      print(f"{name:>9} {b[0]:10.4e} {b[-1]:10.4e} {a[249]:10.4e} {a[499]:10.4e} {a[749]:10.4e} "
            f"{a[999]:10.4e}")
    print(f"linear: abar_999 = {abars['linear'][999]:.4e}")
    t_axis = np.arange(T)
    show(line_plot({k: (t_axis, v) for k, v in abars.items()}, title="abar_t by schedule",
                   xlabel="t", ylabel="abar_t"), scale=1)
    """),
    md("posterior_md", r"""
    ## 3. The posterior and the two reverse variances

    Given $x_0$, the forward process can be reversed exactly (eqs. 6-7):
    $$q(x_{t-1} \mid x_t, x_0) = \mathcal{N}\big(x_{t-1};\ \tilde\mu_t(x_t, x_0),\
    \tilde\beta_t I\big),\qquad
    \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t}\, x_0
    + \frac{\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t}\, x_t,\qquad
    \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\, \beta_t.$$
    The reverse process $p_\theta(x_{t-1} \mid x_t) = \mathcal{N}(\mu_\theta(x_t, t),
    \sigma_t^2 I)$ (eq. 1) learns the mean. Sec. 3.2 fixes $\sigma_t^2 = \beta_t$ (`fixedlarge`,
    optimal for $x_0 \sim \mathcal{N}(0, I)$) or $\sigma_t^2 = \tilde\beta_t$ (`fixedsmall`,
    optimal for $x_0$ a single point): the upper and lower bounds on the reverse process
    entropy, with similar sample quality. They differ only over the first steps:
    $\tilde\beta$ is 0 at code step 0 (the last reverse step adds no noise), so its log is
    clipped there to $\log \tilde\beta_1 = \log(5.4532 \cdot 10^{-5}) = -9.81673$.
    """),
    code("posterior", """
    print(f"{'t':>4} {'beta_t':>11} {'beta~_t':>11} {'beta~/beta':>10}")
    for t in (0, 1, 2, 5, 10, 50, 100, 500, 999):
      print(f"{t:4d} {gd.betas[t]:11.4e} {gd.posterior_variance[t]:11.4e} "
            f"{gd.posterior_variance[t] / gd.betas[t]:10.4f}")
    print(f"beta~_1 = {gd.posterior_variance[1]:.4e}, "
          f"posterior_log_variance_clipped[0] = {gd.posterior_log_variance_clipped[0]:.5f}")
    t_axis = np.arange(1, T)
    variances = {"beta_t": (t_axis, gd.betas[1:]), "beta~_t": (t_axis, gd.posterior_variance[1:])}
    show(line_plot(variances, title="the two reverse variances", xlabel="t", ylabel="variance",
                   log_x=True, log_y=True), scale=1)
    """),
    md("gaussian_md", r"""
    ## 4. A denoiser in closed form

    The network predicts the noise, and the reverse mean follows from it (eq. 11):
    $$\mu_\theta(x_t, t) = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1 -
    \bar\alpha_t}}\, \epsilon_\theta(x_t, t)\Big).$$
    Training on $L_\text{simple}$ (eq. 14) drives $\epsilon_\theta(x_t, t)$ towards
    $\mathbb{E}[\epsilon \mid x_t]$, which has a closed form for Gaussian data. Fit
    $x_0 \sim \mathcal{N}(m, S)$ to the 1,500 training digits (64 dimensions) and write
    $S = U \operatorname{diag}(\lambda) U^\top$. In the eigenbasis the coordinates are
    independent, and
    $$\mathbb{E}[x_0 \mid x_t] = m + U \operatorname{diag}\Big(\frac{\lambda
    \sqrt{\bar\alpha_t}}{\bar\alpha_t \lambda + 1 - \bar\alpha_t}\Big) U^\top
    (x_t - \sqrt{\bar\alpha_t}\, m),\qquad
    \mathbb{E}[\epsilon \mid x_t] = \frac{x_t - \sqrt{\bar\alpha_t}\, \mathbb{E}[x_0 \mid
    x_t]}{\sqrt{1 - \bar\alpha_t}}.$$
    `gaussian_eps(x_t, t)` is a model like the U-Net: any `model_fn(x [B, H, W, C], t [B])`
    works with every function of `GaussianDiffusion`. Its samples are what a perfect network
    would draw if the digits were Gaussian: digit-like blurs.
    """),
    code("gaussian", '''
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
        jax.random.PRNGKey(1))
    print(f"samples shape {samples.shape}")
    show(image_grid.make_grid(image_grid.to_uint8(samples)), scale=6)
    '''),
    md("bpd_md", r"""
    ## 5. The variational bound, term by term

    Training minimises a bound on the negative log likelihood (eqs. 3 and 5):
    $$L = \underbrace{D_\text{KL}(q(x_T \mid x_0) \,\|\, p(x_T))}_{L_T}
    + \sum_{t > 1} \underbrace{D_\text{KL}(q(x_{t-1} \mid x_t, x_0) \,\|\,
    p_\theta(x_{t-1} \mid x_t))}_{L_{t-1}}
    \underbrace{- \log p_\theta(x_0 \mid x_1)}_{L_0}.$$
    $L_T$ (the prior term) has no parameters; each $L_{t-1}$ is a KL between Gaussians (eq. 12
    for the $\epsilon$ parametrisation); $L_0$ is the discretised Gaussian decoder over the 256
    pixel values (eq. 13). `calc_bpd_loop` evaluates every term on a fresh
    $x_t \sim q(x_t \mid x_0)$, in bits per dimension (nats / (64 ln 2) here), for both
    variance choices. In code steps, term $t = 0$ is the decoder $L_0$ and term $t \ge 1$ is
    the paper's $L_t$.
    """),
    code("bpd", """
    NUM_BPD = 16 if SMALL else len(test_data)
    x_eval = test_data[:NUM_BPD]
    bounds = {}
    for var_type in ("fixedlarge", "fixedsmall"):
      d = diffusion.GaussianDiffusion(betas, model_mean_type="eps", model_var_type=var_type)
      out = jax.jit(lambda x, rng, d=d: d.calc_bpd_loop(gaussian_eps, x, rng))(
          x_eval, jax.random.PRNGKey(2))
      bounds[var_type] = out = jax.tree.map(np.asarray, out)
      terms = out["terms_bpd"].mean(axis=0)
      print(f"{var_type}: total {out['total_bpd'].mean():.4f} bits/dim = prior "
            f"{out['prior_bpd'].mean():.2e} + L_1..L_999 {terms[1:].sum():.4f} + "
            f"decoder L_0 {terms[0]:.4f} ({NUM_BPD} test digits)")
    t_axis = np.arange(1, T)
    show(line_plot({k: (t_axis, v["terms_bpd"].mean(axis=0)[1:]) for k, v in bounds.items()},
                   title="the bound's terms L_t", xlabel="t", ylabel="bits/dim",
                   log_x=True, log_y=True), scale=1)
    """),
    md("rd_md", r"""
    ## 6. Rate and distortion (Sec. 4.3, Table 4, Fig. 5)

    The bound is also the length of a progressive code: the sender transmits $x_T$, then
    $x_{T-1}, \dots$, each $x_{t-1}$ given $x_t$ at the cost of $L_{t-1}$ bits (Algorithms 3-4).
    After $k$ reverse steps the receiver has paid the *rate*, $L_T$ plus the terms received, and
    its best guess of the image is the $\hat x_0$ predicted from $x_t$; the *distortion* is that
    guess's RMSE on the 0..255 scale. On CIFAR-10 the paper finds that most of the bits go to
    imperceptible details: the rate ends at 1.78 bits/dim while the decoder's $L_0$ adds 1.97
    (RMSE 0.95). `rate_distortion.rate_distortion` turns `calc_bpd_loop`'s outputs into the
    curve; `render_plot` draws Fig. 5.
    """),
    code("rd", """
    out = bounds["fixedlarge"]
    curve = rate_distortion.rate_distortion(out["terms_bpd"], out["mse"], out["prior_bpd"])
    print(f"{'reverse step':>12} {'rate (bits/dim)':>16} {'distortion (RMSE)':>18}")
    for k, rate, dist in curve.table():
      print(f"{k:12d} {rate:16.5f} {dist:18.5f}")
    decoder = out["terms_bpd"][:, 0].mean()
    print(f"rate at T {curve.rate[-1]:.4f} + decoder {decoder:.4f} = total "
          f"{out['total_bpd'].mean():.4f} bits/dim")
    show(rate_distortion.render_plot(curve.rate, curve.distortion), scale=1)
    """),
    md("end_md", """
    ## Where next

    `quickstart.ipynb` replaces the closed-form denoiser with a trained U-Net;
    `python -m ddpm_jax.main --mode=eval` computes these bits/dim and the rate-distortion
    table for a checkpoint over a whole eval split.
    """),
  ]


# ----------------------------------------------------------------------------------------------
# sample_official_weights.ipynb

DROPBOX = "https://www.dropbox.com/sh/pm6tn31da21yrx4/AABWKZnBzIROmDjGxpB6vn6Ja"


def sample_official_weights() -> list:
  return [
    md("title", f"""
    # Sampling the paper's official weights with ddpm_jax

    {badge("sample_official_weights")}

    The authors of *Denoising Diffusion Probabilistic Models* (Ho, Jain, Abbeel 2020) released
    their trained models, and `ddpm_jax.convert` imports them into a `ddpm_jax` checkpoint: the
    U-Net is the original parameter for parameter, so no weight is retrained or approximated.
    This notebook downloads one model, converts it, checks the conversion and samples it with
    DDIM in 50 steps. Use a GPU runtime (Runtime > Change runtime type).

    **Where the weights are.** Each `MODEL` below has its config `configs/<MODEL>.py`, a TF1
    checkpoint in the authors' release and a diffusers repository on the Hugging Face Hub:

    - `cifar10` (35.7M parameters, 32x32): `diffusion_cifar10_model/model.ckpt-790000`,
      `google/ddpm-cifar10-32`
    - `lsun_church` (114M, 256x256): `diffusion_lsun_church_model/model.ckpt-4432000`,
      `google/ddpm-ema-church-256`
    - `lsun_bedroom`: `diffusion_lsun_bedroom_model/model.ckpt-2388000`,
      `google/ddpm-ema-bedroom-256`
    - `lsun_cat`: `diffusion_lsun_cat_model/model.ckpt-1761000`, `google/ddpm-ema-cat-256`
    - `celeb_a_hq`: diffusers only, `google/ddpm-ema-celebahq-256`

    **TF1 checkpoints** (`SOURCE = "tf"`) are in the `diffusion_models_release` folder linked
    from the [official repository](https://github.com/hojonathanho/diffusion)
    ([Dropbox]({DROPBOX})). Each holds the weights and their `ExponentialMovingAverage` copies,
    which are what the paper samples from and what the converter takes. Download the `.index`
    and `.data-*` files of the model you want, put them on your Google Drive and point
    `TF_ROOT` at the folder.

    **diffusers** (`SOURCE = "diffusers"`, the default) are the same weights converted to
    PyTorch by Hugging Face: one `diffusion_pytorch_model.safetensors` per model repository
    (CIFAR-10: 143 MB), downloaded directly below. Some repositories hold only the older
    PyTorch pickle `diffusion_pytorch_model.bin`; `ddpm_jax.convert` reads it too, without
    `torch`.
    """),
    params_cell('f"ddpm_{MODEL}_{SOURCE}"', """
    MODEL = "cifar10"  # cifar10 | lsun_church | lsun_bedroom | lsun_cat | celeb_a_hq (diffusers)
    SOURCE = "diffusers"  # diffusers: from the Hugging Face Hub; tf: the authors' TF1 checkpoint.
    TF_ROOT = "/content/drive/MyDrive/diffusion_models_release"  # SOURCE = "tf" only.
    """),
    md("install_md", INSTALL_MD),
    code("install", INSTALL),
    code("imports", """
    import importlib
    import io
    import math
    import urllib.error
    import urllib.request

    import IPython.display
    import jax
    import numpy as np
    import safetensors.numpy
    import tensorflow as tf
    from flax import traverse_util
    from PIL import Image

    import configs
    from ddpm_jax import convert, factories, image_grid, sample

    print(f"JAX {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} device(s)")
    """, SHOW),
    md("config_md", """
    ## The config

    The weights fit exactly one U-Net, so the config must be the one the model was trained
    with: `configs/cifar10.py` (35.7M parameters) or one of the 256x256 configs (114M). In the
    test suite (`SMALL`) there is no internet: the notebook writes random weights of a tiny
    U-Net (16x16, ch 32, ch_mult (1, 2), attention at 8x8, T = 20) in the official formats
    and runs the same conversion and sampling on them.
    """),
    code("config", """
    OFFICIAL = {  # MODEL: (config module, diffusers repository, TF1 checkpoint in TF_ROOT)
        "cifar10": ("cifar10", "google/ddpm-cifar10-32",
                    "diffusion_cifar10_model/model.ckpt-790000"),
        "lsun_church": ("lsun_church", "google/ddpm-ema-church-256",
                        "diffusion_lsun_church_model/model.ckpt-4432000"),
        "lsun_bedroom": ("lsun_bedroom", "google/ddpm-ema-bedroom-256",
                         "diffusion_lsun_bedroom_model/model.ckpt-2388000"),
        "lsun_cat": ("lsun_cat", "google/ddpm-ema-cat-256",
                     "diffusion_lsun_cat_model/model.ckpt-1761000"),
        "celeb_a_hq": ("celeb_a_hq", "google/ddpm-ema-celebahq-256", None),
    }
    config_module, hub_repo, tf_checkpoint = OFFICIAL[MODEL]
    config = importlib.import_module(f"configs.{config_module}").get_config()
    OVERRIDES = {}
    if SMALL:
      OVERRIDES = {"data.image_size": 16, "model.ch": 32, "model.ch_mult": (1, 2),
                   "model.num_res_blocks": 1, "model.attn_resolutions": (8,),
                   "diffusion.num_timesteps": 20}
    for key, value in OVERRIDES.items():
      section, field = key.split(".")
      config[section][field] = value
    config_file = os.path.join(os.path.dirname(configs.__file__), f"{config_module}.py")
    model = factories.create_model(config)
    image_shape = factories.image_shape(config)
    num_params = sum(math.prod(v.shape) for v in convert.variable_shapes(config).values())
    print(f"{config_file}: images {image_shape}, U-Net of {num_params:,} parameters")
    """),
    md("download_md", """
    ## Download

    The diffusers weights come straight from the Hub (`huggingface.co/<repo>/resolve/main/<file>`,
    no account needed); the TF1 checkpoint must already be at `TF_ROOT` (mount your Drive with
    `from google.colab import drive; drive.mount("/content/drive")`). Files are downloaded once
    into `WORKDIR/download`.
    """),
    code("download", '''
    def hub_download(repo: str, filename: str, directory: str) -> str | None:
      """Downloads huggingface.co/<repo>/resolve/main/<filename> once; None if it is absent."""
      path = os.path.join(directory, filename)
      if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        url = f"https://huggingface.co/{repo}/resolve/main/{filename}"
        try:
          urllib.request.urlretrieve(url, path + ".part")
        except urllib.error.HTTPError as e:
          if e.code == 404:
            return None
          raise
        os.replace(path + ".part", path)
      return path


    def download_diffusers(repo: str, directory: str) -> str:
      """`directory` with the repository's config.json and weights (safetensors, else .bin)."""
      hub_download(repo, "config.json", directory)
      if hub_download(repo, "diffusion_pytorch_model.safetensors", directory) is None:
        hub_download(repo, "diffusion_pytorch_model.bin", directory)  # Older repositories.
      return directory


    if SMALL:
      print("test mode: no download (random weights in the official formats below)")
    elif SOURCE == "diffusers":
      INPUT = download_diffusers(hub_repo, os.path.join(WORKDIR, "download"))
      print(f"{hub_repo}: {sorted(os.listdir(INPUT))}")
    else:
      if tf_checkpoint is None:
        raise ValueError(f"No TF1 checkpoint of {MODEL} was released; use SOURCE = 'diffusers'.")
      INPUT = os.path.join(TF_ROOT, tf_checkpoint)
      if not tf.io.gfile.exists(INPUT + ".index"):
        raise FileNotFoundError(
            f"{INPUT}.index does not exist: put the .index and .data-* files of {tf_checkpoint} "
            f"from the authors' release there (see the top of this notebook), or set TF_ROOT.")
      print(f"TF1 checkpoint {INPUT}")
    '''),
    md("synthetic_md", """
    **Test mode only:** random weights of the tiny U-Net (no layer near zero, so a wrong mapping
    shows), written as the authors' TF1 checkpoint would hold them (names under `model/`, EMA
    copies under `<name>/ExponentialMovingAverage`, here another random draw) and as a diffusers
    safetensors file. `convert.to_tf_names` and `convert.to_diffusers_state_dict` are the
    inverse mappings of the importers.
    """),
    code("synthetic", '''
    def random_params(config, seed: int) -> dict:
      """Random weights of the config's U-Net (numpy), scaled like a trained network's."""
      rng = np.random.default_rng(seed)
      flat = {}
      for path, leaf in convert.variable_shapes(config).items():
        fan_in = math.prod(leaf.shape[:-1]) if path.endswith("/kernel") else 100
        flat[path] = (rng.normal(size=leaf.shape) / math.sqrt(fan_in)
                      + path.endswith("/scale")).astype(np.float32)
      return traverse_util.unflatten_dict(flat, sep="/")


    def write_tf1_checkpoint(prefix: str, variables: dict) -> str:
      """Writes {TF name: array} as a TF1 name-based checkpoint (.index and .data files)."""
      names = sorted(variables)
      tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                        tensors=[variables[n] for n in names])
      return prefix


    if SMALL:
      source_params = random_params(config, seed=1)  # The EMA weights, which convert imports.
      raw = convert.to_tf_names(random_params(config, seed=0))
      ema = {name + convert.EMA_SUFFIX: v for name, v in convert.to_tf_names(source_params).items()}
      synthetic = os.path.join(WORKDIR, "synthetic")
      os.makedirs(synthetic, exist_ok=True)
      inputs = {
          "tf": write_tf1_checkpoint(os.path.join(synthetic, "model.ckpt-790000"), raw | ema),
          "diffusers": os.path.join(synthetic, "diffusion_pytorch_model.safetensors"),
      }
      state_dict = convert.to_diffusers_state_dict(source_params)
      safetensors.numpy.save_file(state_dict, inputs["diffusers"])
      INPUT = inputs[SOURCE]
      print(f"wrote {len(raw | ema)} TF variables and {len(state_dict)} diffusers tensors; "
            f"converting {INPUT}")
    '''),
    md("convert_md", """
    ## Convert

    `convert.convert(SOURCE, INPUT, config, WORKDIR)` reads the weights (`from_tf_checkpoint`
    or `from_diffusers`), checks every name and shape against the config's U-Net (a mismatch
    ends in one message listing each problem and the config that fits), and writes
    `WORKDIR/checkpoints/<step>`: a full train state whose parameters and EMA parameters are the
    imported weights, so `--mode=sample`, `--mode=eval` and `--mode=figures` use it as it is. The
    step is the TF checkpoint's (790000 for CIFAR-10), else 0. It is exactly what the command
    line printed below does.
    """),
    code("convert", """
    if SOURCE == "tf":
      step = convert.tf_checkpoint_step(convert.resolve_tf_checkpoint(INPUT))
    else:
      step = 0
    checkpoint = os.path.join(WORKDIR, "checkpoints", str(step))
    if os.path.isdir(checkpoint):
      print(f"{checkpoint} exists: already converted (delete it to convert again)")
    else:
      checkpoint = convert.convert(SOURCE, INPUT, config, WORKDIR)
      print(f"wrote {checkpoint}")
    flags = [f"--source={SOURCE}", f"--input={INPUT}", f"--config={config_file}",
             *(f"--config.{k}='{v}'" for k, v in OVERRIDES.items()), f"--workdir={WORKDIR}"]
    print("the same from a shell: python -m ddpm_jax.convert", " ".join(flags))
    """),
    md("check_md", """
    ## Check

    The EMA parameters restored from the new checkpoint (as `--mode=sample` restores them) run
    on a random batch, against a reference: in test mode the random source weights, so the two
    outputs must agree to float32 rounding; otherwise the weights read again with the API
    (`from_diffusers` / `from_tf_checkpoint`). `tests/test_convert.py` checks the imported U-Net
    against the original TensorFlow graph and against diffusers' `UNet2DModel`. With
    `SOURCE = "diffusers"` on Colab the next cell can also compare with `UNet2DModel` itself
    (it installs `diffusers`).
    """),
    code("check", """
    ema_params, restored_step = sample.restore_ema_params(config, WORKDIR)
    ema_params = jax.device_get(ema_params)
    if SMALL:
      reference, what = source_params, "the source weights"
    elif SOURCE == "tf":
      reference, what = convert.from_tf_checkpoint(INPUT, config), "the TF1 checkpoint"
    else:
      reference = convert.from_diffusers(convert.load_diffusers_state_dict(INPUT, config), config)
      what = "the safetensors file"
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (4, *image_shape)).astype(np.float32)
    t = np.linspace(0, config.diffusion.num_timesteps - 1, 4).astype(np.int32)
    apply = jax.jit(model.apply)
    ours = np.asarray(apply({"params": ema_params}, x, t))
    theirs = np.asarray(apply({"params": reference}, x, t))
    print(f"restored step {restored_step}; output std {ours.std():.4f}")
    print(f"max abs diff between the outputs of the converted model and of {what}: "
          f"{np.abs(ours - theirs).max():.3e}")
    """),
    code("check_torch", """
    CHECK_WITH_PYTORCH = not SMALL and SOURCE == "diffusers"
    if CHECK_WITH_PYTORCH:
      if importlib.util.find_spec("diffusers") is None:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "diffusers"])
      import torch
      from diffusers import UNet2DModel

      unet = UNet2DModel.from_pretrained(INPUT).eval()
      with torch.no_grad():
        out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
      torch_out = out.numpy().transpose(0, 2, 3, 1)
      print(f"max abs diff to diffusers' UNet2DModel: {np.abs(ours - torch_out).max():.3e}")
    else:
      print("skipped (needs SOURCE = 'diffusers' and the real weights)")
    """),
    md("sample_md", """
    ## Sample with DDIM, 50 steps

    `sample.run_sampling(config, WORKDIR)` is `--mode=sample`: it restores the EMA parameters,
    draws `sample.num_samples` images spread over all devices and writes them as `.npz` shards
    and a `grid.png` (rerunning skips the shards already written). DDIM with eta = 0 (Song et
    al. 2021) needs 50 network evaluations instead of the paper's 1000 ancestral steps; on
    CIFAR-10 its FID is about 4.7 (Song et al., Table 1) against the paper's 3.17. Set
    `config.sample.sampler = "ancestral"` and `config.sample.num_steps = 1000` for the paper's
    sampler.
    """),
    code("sample", """
    config.sample.sampler = "ddim"
    config.sample.eta = 0.0
    config.sample.num_steps = 10 if SMALL else 50
    config.sample.num_samples = 16 if SMALL or config.data.image_size > 64 else 64
    config.sample.batch_size = config.sample.num_samples
    directory = sample.run_sampling(config, WORKDIR)
    samples = sample.load_samples(directory)
    print(f"samples shape {samples.shape} {samples.dtype} in {directory}")
    show(image_grid.make_grid(samples), scale=max(1, 128 // config.data.image_size))
    """),
  ]


# ----------------------------------------------------------------------------------------------


NOTEBOOKS = {  # name: (cells, Colab runtime: "GPU" or None for a CPU runtime)
    "quickstart": (quickstart, "GPU"),
    "sample_official_weights": (sample_official_weights, "GPU"),
    "diffusion_explained": (diffusion_explained, None),
}


def build(name: str) -> nbformat.NotebookNode:
  make_cells, accelerator = NOTEBOOKS[name]
  nb = v4.new_notebook(cells=make_cells())
  nb.metadata = {
      "colab": {"name": f"{name}.ipynb", "provenance": [], "toc_visible": True},
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
  }
  if accelerator:
    nb.metadata["accelerator"] = accelerator
    nb.metadata["colab"]["gpuType"] = "T4"
  nbformat.validate(nb)
  return nb


def path_of(name: str) -> str:
  return os.path.join(HERE, f"{name}.ipynb")


def render(name: str) -> str:
  return nbformat.writes(build(name)) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare instead of writing")
  args = parser.parse_args(argv)
  stale = []
  for name in NOTEBOOKS:
    text = render(name)
    if args.check:
      with open(path_of(name), encoding="utf-8") as f:
        if f.read() != text:
          stale.append(name)
    else:
      with open(path_of(name), "w", encoding="utf-8") as f:
        f.write(text)
  for name in stale:
    print(f"{path_of(name)} is out of date: run python notebooks/_build.py", file=sys.stderr)
  return 1 if stale else 0


if __name__ == "__main__":
  sys.exit(main())
