# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     name: export_to_diffusers.ipynb
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
# # From ddpm_jax to diffusers: export a trained run and sample it in PyTorch
#
# **In Colab:** File > Open notebook > GitHub, enter the repository that holds your copy of
# ddpm_jax and pick `notebooks/export_to_diffusers.ipynb` (or File > Upload notebook), then set
# `REPO_URL` in the first cell to that repository's git URL.
#
# A model trained with ddpm_jax, on a laptop or a TPU pod, lives in its work directory: the
# resolved `config.json`, Orbax checkpoints and the metrics the run measured. Most people who
# sample, fine-tune or publish diffusion models use PyTorch and Hugging Face diffusers.
# `ddpm_jax.convert.export_run` (the command `python -m ddpm_jax.convert --to=diffusers`) writes
# one checkpoint as a diffusers `DDPMPipeline` directory: the U-Net as `UNet2DModel` weights in
# safetensors, the diffusion as a `DDPMScheduler` config, and a model card. From then on
# `DDPMPipeline.from_pretrained(directory)` is all it takes; no JAX.
#
# This notebook exports the digits run that `./train_digits.sh` leaves in `workdir_digits`,
# checks that the weights come back bit for bit, then loads the directory with diffusers and
# samples it on PyTorch.

# %% cell_id="params"
# Parameters. The test suite sets DDPM_NOTEBOOK_SMALL=1: tiny settings, nothing downloaded.
# In Colab leave it unset for the real run.
import os

SMALL = os.environ.get("DDPM_NOTEBOOK_SMALL") == "1"
REPO_URL = ""  # The git URL of your ddpm_jax repository; needed outside a checkout only.
RUN = ""  # The run to export; "" = workdir_digits of the checkout (what ./train_digits.sh left).
OUTPUT = os.path.abspath("ddpm_digits_diffusers")  # The diffusers directory to write.

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
import importlib.util
import io

import IPython.display
import jax
import numpy as np
from flax import traverse_util
from PIL import Image

from configs import digits
from ddpm_jax import convert, image_grid, model_bundle
from ddpm_jax.weights import export, matching

print(f"JAX {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} device(s)")


def show(image: np.ndarray, scale: int = 4) -> None:
  """Displays a uint8 image [H, W, C] (C = 1 or 3) as a PNG, enlarged by pixel repetition."""
  image = np.asarray(image).repeat(scale, axis=0).repeat(scale, axis=1)
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  IPython.display.display(IPython.display.Image(data=buffer.getvalue()))


# %% [markdown]
# ## The run
#
# `RUN` is a work directory of `python -m ddpm_jax.main --mode=train`; by default the
# `workdir_digits` that `./train_digits.sh` leaves in the checkout (about 10 minutes on 2 CPU
# cores; `quickstart.ipynb` trains one too, in `notebooks/ddpm_quickstart`). In the test suite
# (`SMALL`) there is no time to train: the notebook makes a run of the same layout, a
# `config.json` and a checkpoint at step 4, for a tiny U-Net (ch 32, one level, T = 20) with
# random weights, written by `convert.save_checkpoint` as the importer writes its checkpoints.


# %% cell_id="run"
def random_params(config, seed: int) -> dict:
  """Random weights of the config's U-Net (numpy), scaled like a trained network's."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in matching.variable_shapes(config).items():
    fan_in = np.prod(leaf.shape[:-1]) if path.endswith("/kernel") else 100
    flat[path] = (rng.normal(size=leaf.shape) / np.sqrt(fan_in) + path.endswith("/scale")).astype(
      np.float32
    )
  return traverse_util.unflatten_dict(flat, sep="/")


if SMALL:
  RUN = os.path.abspath("ddpm_export_tiny_run")
  if not os.path.isdir(os.path.join(RUN, "checkpoints")):
    tiny = digits.get_config()
    tiny.model.update(ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    tiny.diffusion.num_timesteps = 20
    os.makedirs(RUN, exist_ok=True)
    with open(os.path.join(RUN, "config.json"), "w") as f:
      f.write(tiny.to_json_best_effort(indent=2, sort_keys=True))
    convert.save_checkpoint(random_params(tiny, seed=0), tiny, RUN, step=4)
elif not RUN:
  checkout = find_checkout()  # From the install cell.
  RUN = str(checkout / "workdir_digits") if checkout else os.path.abspath("workdir_digits")
if not os.path.isdir(os.path.join(RUN, "checkpoints")):
  raise FileNotFoundError(
    f"{RUN} has no checkpoints: train the digits first (./train_digits.sh, or "
    "quickstart.ipynb), or set RUN to the workdir of a run."
  )
config = export.run_config(RUN)  # The config the run was trained with.
d = config.diffusion
print(
  f"run {RUN}: {config.data.dataset} {model_bundle.image_shape(config)}, "
  f"T = {d.num_timesteps}, {d.beta_schedule} betas, predicts {d.model_mean_type}, "
  f"variance {d.model_var_type}"
)

# %% [markdown]
# ## Export
#
# `convert.export_run(RUN, OUTPUT)` reads the EMA parameters of the latest checkpoint
# (`step=N` picks another, `use_ema=False` the raw parameters) without touching the run, and
# writes the pipeline. Everything is checked first: a config field that diffusers cannot
# express (say `model.resamp_with_conv=False`, or the posterior-mean parameterisation `xprev`)
# ends in one message naming it, and a directory that is not empty is not overwritten
# without `overwrite=True` (`--overwrite`).

# %% cell_id="export"
directory, step = convert.export_run(RUN, OUTPUT, overwrite=True)
print(f"wrote {directory} from step {step}:")
for root, _, files in sorted(os.walk(directory)):
  for name in sorted(files):
    path = os.path.join(root, name)
    print(f"  {os.path.relpath(path, directory):45s} {os.path.getsize(path):>10,} bytes")
print(
  "the same from a shell: python -m ddpm_jax.convert --to=diffusers "
  f"--workdir={RUN} --output={OUTPUT} --overwrite"
)

# %% [markdown]
# The model card, `README.md`, is what the Hugging Face Hub shows on the model's page: how to
# load it, the step and the training setup, the metrics the run measured (bits/dim from
# `--mode=eval`, FID from the end of training or from `--mode=eval`) and the whole config.

# %% cell_id="card"
with open(os.path.join(OUTPUT, "README.md")) as f:
  card = f.read()
print(card[card.index("## Weights") : card.index("## Config")])

# %% [markdown]
# ## The round trip
#
# Importing the directory again (`convert.from_diffusers`, what `--source=diffusers` runs)
# gives back the checkpoint's EMA parameters exactly: every tensor, bit for bit.

# %% cell_id="round_trip"
bundle = model_bundle.ModelBundle.from_config(config)
ema_params, _ = bundle.load_ema_params(RUN, step)
ema = traverse_util.flatten_dict(jax.device_get(ema_params), sep="/")
back = traverse_util.flatten_dict(
  convert.from_diffusers(convert.load_diffusers_state_dict(OUTPUT, config), config), sep="/"
)
equal = sorted(ema) == sorted(back) and all(
  ema[p].dtype == back[p].dtype and ema[p].tobytes() == back[p].tobytes() for p in ema
)
print(
  f"round trip: {len(ema)} tensors, {sum(v.size for v in ema.values()):,} parameters, "
  f"bit for bit equal: {equal}"
)

# %% [markdown]
# ## In PyTorch
#
# The rest needs only `torch` and `diffusers` (Colab has `torch`; the next cell installs
# `diffusers` there if it is missing). `DDPMPipeline.from_pretrained` builds the `UNet2DModel`
# and the `DDPMScheduler` from the directory. First the same input through both U-Nets: the
# outputs agree to float32 rounding (`tests/test_weights_export.py` holds it, and holds
# `DDPMScheduler.step` to our ancestral step).

# %% cell_id="torch_load"
HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "diffusers"))
if not HAVE_TORCH and not SMALL:
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "diffusers"])
  HAVE_TORCH = True
if HAVE_TORCH:
  import torch
  from diffusers import DDPMPipeline

  pipe = DDPMPipeline.from_pretrained(OUTPUT)
  s = pipe.scheduler.config
  print(
    f"{type(pipe.unet).__name__} of {sum(p.numel() for p in pipe.unet.parameters()):,} "
    f"parameters; {type(pipe.scheduler).__name__}: T = {s.num_train_timesteps}, "
    f"{s.beta_schedule} betas, {s.prediction_type}, {s.variance_type}, clip {s.clip_sample}"
  )
  rng = np.random.default_rng(0)
  x = rng.uniform(-1.0, 1.0, (4, *bundle.image_shape)).astype(np.float32)
  t = np.linspace(0, d.num_timesteps - 1, 4).astype(np.int32)
  ours = np.asarray(jax.jit(bundle.model.apply)({"params": ema_params}, x, t))
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  print(f"max abs diff between diffusers' UNet2DModel and ours: {np.abs(theirs - ours).max():.2e}")
else:
  print("skipped: torch and diffusers are not installed (pip install -e '.[test-diffusers]')")

# %% [markdown]
# ## Sampling with diffusers
#
# The pipeline runs the paper's ancestral sampler, `num_inference_steps` = T, from a PyTorch
# generator, and returns images in [0, 1]. For fewer steps, swap in DDIM:
# `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)` and
# `pipe(num_inference_steps=50)`.

# %% cell_id="torch_sample"
if HAVE_TORCH:
  NUM_SAMPLES = 16 if SMALL else 64
  generator = torch.Generator().manual_seed(0)
  images = pipe(
    batch_size=NUM_SAMPLES,
    num_inference_steps=d.num_timesteps,
    generator=generator,
    output_type="np",
  ).images
  print(f"diffusers samples {images.shape}, values in [{images.min():.2f}, {images.max():.2f}]")
  show(image_grid.make_grid(image_grid.to_uint8(images * 2.0 - 1.0)), scale=6)
else:
  print("skipped: torch and diffusers are not installed")

# %% [markdown]
# ## From the command line, and publishing
#
# ```sh
# python -m ddpm_jax.convert --to=diffusers --workdir=workdir_digits --output=ddpm-digits
# python -m ddpm_jax.convert --to=diffusers --workdir=RUN --output=DIR --step=1000 --ema=false
# ```
#
# The directory is a Hugging Face model repository as it is: `huggingface-cli upload
# NAME/ddpm-digits ddpm-digits` (from `huggingface_hub`, with your account or organisation as
# NAME) publishes it, model card included, and `DDPMPipeline.from_pretrained("NAME/ddpm-digits")`
# loads it from the Hub.
