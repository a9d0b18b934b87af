# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     name: sample_official_weights.ipynb
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
# # Sampling the paper's official weights with ddpm_jax
#
# **In Colab:** File > Open notebook > GitHub, enter the repository that holds your copy of
# ddpm_jax and pick `notebooks/sample_official_weights.ipynb` (or File > Upload notebook), then
# set `REPO_URL` in the first cell to that repository's git URL.
#
# The authors of *Denoising Diffusion Probabilistic Models* (Ho, Jain, Abbeel 2020) released
# their trained models, and `ddpm_jax.convert` imports them into a `ddpm_jax` checkpoint: the
# U-Net is the original parameter for parameter, so no weight is retrained or approximated.
# This notebook downloads one model, converts it, checks the conversion and samples it with
# DDIM in 50 steps. Use a GPU runtime (Runtime > Change runtime type).
#
# **Where the weights are.** Each `MODEL` below has its config `configs/<MODEL>.py`, a TF1
# checkpoint in the authors' release and a diffusers repository on the Hugging Face Hub:
#
# - `cifar10` (35.7M parameters, 32x32): `diffusion_cifar10_model/model.ckpt-790000`,
#   `google/ddpm-cifar10-32`
# - `lsun_church` (114M, 256x256): `diffusion_lsun_church_model/model.ckpt-4432000`,
#   `google/ddpm-ema-church-256`
# - `lsun_bedroom`: `diffusion_lsun_bedroom_model/model.ckpt-2388000`,
#   `google/ddpm-ema-bedroom-256`
# - `lsun_cat`: `diffusion_lsun_cat_model/model.ckpt-1761000`, `google/ddpm-ema-cat-256`
# - `celeb_a_hq`: diffusers only, `google/ddpm-ema-celebahq-256`
#
# **TF1 checkpoints** (`SOURCE = "tf"`) are in the `diffusion_models_release` folder linked
# from the [official repository](https://github.com/hojonathanho/diffusion)
# ([Dropbox](https://www.dropbox.com/sh/pm6tn31da21yrx4/AABWKZnBzIROmDjGxpB6vn6Ja)).
# Each holds the weights and their `ExponentialMovingAverage` copies,
# which are what the paper samples from and what the converter takes. Download the `.index`
# and `.data-*` files of the model you want, put them on your Google Drive and point
# `TF_ROOT` at the folder.
#
# **diffusers** (`SOURCE = "diffusers"`, the default) are the same weights converted to
# PyTorch by Hugging Face: one `diffusion_pytorch_model.safetensors` per model repository
# (CIFAR-10: 143 MB), downloaded directly below. Some repositories hold only the older
# PyTorch pickle `diffusion_pytorch_model.bin`; `ddpm_jax.convert` reads it too, without
# `torch`.

# %% cell_id="params"
# Parameters. The test suite sets DDPM_NOTEBOOK_SMALL=1: tiny settings, nothing downloaded.
# In Colab leave it unset for the real run.
import os

SMALL = os.environ.get("DDPM_NOTEBOOK_SMALL") == "1"
REPO_URL = ""  # The git URL of your ddpm_jax repository; needed outside a checkout only.
MODEL = "cifar10"  # cifar10 | lsun_church | lsun_bedroom | lsun_cat | celeb_a_hq (diffusers)
SOURCE = "diffusers"  # diffusers: from the Hugging Face Hub; tf: the authors' TF1 checkpoint.
TF_ROOT = "/content/drive/MyDrive/diffusion_models_release"  # SOURCE = "tf" only.
WORKDIR = os.path.abspath(f"ddpm_{MODEL}_{SOURCE}")  # Checkpoints and samples; rerunning resumes.

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
from ddpm_jax import convert, image_grid, model_bundle
from ddpm_jax.sampling import shards
from ddpm_jax.weights import diffusers as diffusers_weights
from ddpm_jax.weights import matching, tf1

print(f"JAX {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} device(s)")


def show(image: np.ndarray, scale: int = 4) -> None:
  """Displays a uint8 image [H, W, C] (C = 1 or 3) as a PNG, enlarged by pixel repetition."""
  image = np.asarray(image).repeat(scale, axis=0).repeat(scale, axis=1)
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  IPython.display.display(IPython.display.Image(data=buffer.getvalue()))


# %% [markdown]
# ## The config
#
# The weights fit exactly one U-Net, so the config must be the one the model was trained
# with: `configs/cifar10.py` (35.7M parameters) or one of the 256x256 configs (114M). In the
# test suite (`SMALL`) there is no internet: the notebook writes random weights of a tiny
# U-Net (16x16, ch 32, ch_mult (1, 2), attention at 8x8, T = 20) in the official formats
# and runs the same conversion and sampling on them.

# %% cell_id="config"
OFFICIAL = {  # MODEL: (config module, diffusers repository, TF1 checkpoint in TF_ROOT)
  "cifar10": ("cifar10", "google/ddpm-cifar10-32", "diffusion_cifar10_model/model.ckpt-790000"),
  "lsun_church": (
    "lsun_church",
    "google/ddpm-ema-church-256",
    "diffusion_lsun_church_model/model.ckpt-4432000",
  ),
  "lsun_bedroom": (
    "lsun_bedroom",
    "google/ddpm-ema-bedroom-256",
    "diffusion_lsun_bedroom_model/model.ckpt-2388000",
  ),
  "lsun_cat": (
    "lsun_cat",
    "google/ddpm-ema-cat-256",
    "diffusion_lsun_cat_model/model.ckpt-1761000",
  ),
  "celeb_a_hq": ("celeb_a_hq", "google/ddpm-ema-celebahq-256", None),
}
config_module, hub_repo, tf_checkpoint = OFFICIAL[MODEL]
config = importlib.import_module(f"configs.{config_module}").get_config()
OVERRIDES = {}
if SMALL:
  OVERRIDES = {
    "data.image_size": 16,
    "model.ch": 32,
    "model.ch_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (8,),
    "diffusion.num_timesteps": 20,
  }
for key, value in OVERRIDES.items():
  section, field = key.split(".")
  config[section][field] = value
config_file = os.path.join(os.path.dirname(configs.__file__), f"{config_module}.py")
model = model_bundle.create_model(config)
image_shape = model_bundle.image_shape(config)
num_params = sum(math.prod(v.shape) for v in matching.variable_shapes(config).values())
print(f"{config_file}: images {image_shape}, U-Net of {num_params:,} parameters")


# %% [markdown]
# ## Download
#
# The diffusers weights come straight from the Hub (`huggingface.co/<repo>/resolve/main/<file>`,
# no account needed); the TF1 checkpoint must already be at `TF_ROOT` (mount your Drive with
# `from google.colab import drive; drive.mount("/content/drive")`). Files are downloaded once
# into `WORKDIR/download`.


# %% cell_id="download"
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
      f"from the authors' release there (see the top of this notebook), or set TF_ROOT."
    )
  print(f"TF1 checkpoint {INPUT}")


# %% [markdown]
# **Test mode only:** random weights of the tiny U-Net (no layer near zero, so a wrong mapping
# shows), written as the authors' TF1 checkpoint would hold them (names under `model/`, EMA
# copies under `<name>/ExponentialMovingAverage`, here another random draw) and as a diffusers
# safetensors file. `convert.to_tf_names` and `convert.to_diffusers_state_dict` are the
# inverse mappings of the importers.


# %% cell_id="synthetic"
def random_params(config, seed: int) -> dict:
  """Random weights of the config's U-Net (numpy), scaled like a trained network's."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in matching.variable_shapes(config).items():
    fan_in = math.prod(leaf.shape[:-1]) if path.endswith("/kernel") else 100
    flat[path] = (rng.normal(size=leaf.shape) / math.sqrt(fan_in) + path.endswith("/scale")).astype(
      np.float32
    )
  return traverse_util.unflatten_dict(flat, sep="/")


def write_tf1_checkpoint(prefix: str, variables: dict) -> str:
  """Writes {TF name: array} as a TF1 name-based checkpoint (.index and .data files)."""
  names = sorted(variables)
  tf.raw_ops.SaveV2(
    prefix=prefix,
    tensor_names=names,
    shape_and_slices=[""] * len(names),
    tensors=[variables[n] for n in names],
  )
  return prefix


if SMALL:
  source_params = random_params(config, seed=1)  # The EMA weights, which convert imports.
  raw = tf1.to_tf_names(random_params(config, seed=0))
  ema = {name + tf1.EMA_SUFFIX: v for name, v in tf1.to_tf_names(source_params).items()}
  synthetic = os.path.join(WORKDIR, "synthetic")
  os.makedirs(synthetic, exist_ok=True)
  inputs = {
    "tf": write_tf1_checkpoint(os.path.join(synthetic, "model.ckpt-790000"), raw | ema),
    "diffusers": os.path.join(synthetic, "diffusion_pytorch_model.safetensors"),
  }
  state_dict = diffusers_weights.to_diffusers_state_dict(source_params)
  safetensors.numpy.save_file(state_dict, inputs["diffusers"])
  INPUT = inputs[SOURCE]
  print(
    f"wrote {len(raw | ema)} TF variables and {len(state_dict)} diffusers tensors; "
    f"converting {INPUT}"
  )

# %% [markdown]
# ## Convert
#
# `convert.convert(SOURCE, INPUT, config, WORKDIR)` reads the weights (`from_tf_checkpoint`
# or `from_diffusers`), checks every name and shape against the config's U-Net (a mismatch
# ends in one message listing each problem and the config that fits), and writes
# `WORKDIR/checkpoints/<step>`: a full train state whose parameters and EMA parameters are the
# imported weights, so `--mode=sample`, `--mode=eval` and `--mode=figures` use it as it is. The
# step is the TF checkpoint's (790000 for CIFAR-10), else 0. It is exactly what the command
# line printed below does.

# %% cell_id="convert"
if SOURCE == "tf":
  step = tf1.tf_checkpoint_step(tf1.resolve_tf_checkpoint(INPUT))
else:
  step = 0
checkpoint = os.path.join(WORKDIR, "checkpoints", str(step))
if os.path.isdir(checkpoint):
  print(f"{checkpoint} exists: already converted (delete it to convert again)")
else:
  checkpoint = convert.convert(SOURCE, INPUT, config, WORKDIR)
  print(f"wrote {checkpoint}")
flags = [
  f"--source={SOURCE}",
  f"--input={INPUT}",
  f"--config={config_file}",
  *(f"--config.{k}='{v}'" for k, v in OVERRIDES.items()),
  f"--workdir={WORKDIR}",
]
print("the same from a shell: python -m ddpm_jax.convert", " ".join(flags))

# %% [markdown]
# ## Check
#
# The EMA parameters restored from the new checkpoint (as `--mode=sample` restores them) run
# on a random batch, against a reference: in test mode the random source weights, so the two
# outputs must agree to float32 rounding; otherwise the weights read again with the API
# (`from_diffusers` / `from_tf_checkpoint`). `tests/test_convert.py` checks the imported U-Net
# against the original TensorFlow graph and against diffusers' `UNet2DModel`. With
# `SOURCE = "diffusers"` on Colab the next cell can also compare with `UNet2DModel` itself
# (it installs `diffusers`).

# %% cell_id="check"
ema_params, restored_step = model_bundle.ModelBundle.from_config(config).load_ema_params(WORKDIR)
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
print(
  f"max abs diff between the outputs of the converted model and of {what}: "
  f"{np.abs(ours - theirs).max():.3e}"
)

# %% cell_id="check_torch"
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

# %% [markdown]
# ## Sample with DDIM, 50 steps
#
# `sample.run_sampling(config, WORKDIR)` is `--mode=sample`: it restores the EMA parameters,
# draws `sample.num_samples` images spread over all devices and writes them as `.npz` shards
# and a `grid.png` (rerunning skips the shards already written). DDIM with eta = 0 (Song et
# al. 2021) needs 50 network evaluations instead of the paper's 1000 ancestral steps; on
# CIFAR-10 its FID is about 4.7 (Song et al., Table 1) against the paper's 3.17. Set
# `config.sample.sampler = "ancestral"` and `config.sample.num_steps = 1000` for the paper's
# sampler.

# %% cell_id="sample"
config.sample.sampler = "ddim"
config.sample.eta = 0.0
config.sample.num_steps = 10 if SMALL else 50
config.sample.num_samples = 16 if SMALL or config.data.image_size > 64 else 64
config.sample.batch_size = config.sample.num_samples
directory = shards.run_sampling(config, WORKDIR)
samples = shards.load_samples(directory)
print(f"samples shape {samples.shape} {samples.dtype} in {directory}")
show(image_grid.make_grid(samples), scale=max(1, 128 // config.data.image_size))
