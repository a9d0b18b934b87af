"""Weights out: a run's params as a diffusers `DDPMPipeline` directory, which
`diffusers.DDPMPipeline.from_pretrained(directory)` loads as it is.

  python -m ddpm_jax.convert --to=diffusers --workdir=RUN --output=DIR [--step=N] [--ema=false]

  DIR/model_index.json                           DDPMPipeline = unet + scheduler
  DIR/unet/config.json                           UNet2DModel (`diffusers.unet2d_config`)
  DIR/unet/diffusion_pytorch_model.safetensors   the weights: float32, PyTorch layouts
  DIR/scheduler/scheduler_config.json            DDPMScheduler (`diffusers.ddpm_scheduler_config`)
  DIR/README.md                                  model card: config, step, data, measured metrics

`from_diffusers(load_diffusers_state_dict(DIR), config)` gives the params back bit for bit
(bfloat16 params are stored widened to float32, exactly). Every check - the config has diffusers
counterparts, the params fit it, DIR is empty or `overwrite` - runs before anything is written;
model_index.json, which makes DIR a pipeline, is written last. With `overwrite` these five files
are replaced and anything else in DIR is left alone.

The exported `DDPMScheduler.step` is our ancestral step (`GaussianDiffusion.p_sample`) for each
variance type it takes: its step code with its tables in float64, as ours are, gives ours to 1e-6
at every t. As loaded, its tables are float32 (betas, abar, 1 - abar_t): from t = 50 on it stays
within 1e-5 of ours, but where 1 - abar_t is small (t < 24 with the paper's linear betas) it is up
to 3e-4 away, its float32 rounding, not ours (tests/test_weights_export.py). At t = 0 neither adds
noise: fixedlarge's log variance there (ours log beta~_1, the bound's decoder width; diffusers'
log beta_0) is never used in sampling.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors.numpy
from flax import traverse_util

from ddpm_jax import file_io, model_bundle
from ddpm_jax.checkpoints import readers
from ddpm_jax.weights import diffusers
from ddpm_jax.weights.matching import ConversionError, Params, check

# The diffusers release the written configs are tested against (setup.py's test-diffusers).
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_FILE = "unet/diffusion_pytorch_model.safetensors"
FILES = (
  "README.md",
  "unet/config.json",
  WEIGHTS_FILE,
  "scheduler/scheduler_config.json",
  "model_index.json",  # Last: without it the directory is no pipeline.
)


@dataclasses.dataclass(frozen=True)
class Provenance:
  """Where exported params come from, for the model card: a run's checkpoint and its metrics
  (lines of text, measured on the run's EMA params)."""

  workdir: str
  step: int
  ema: bool = True
  metrics: tuple[str, ...] = ()


# -- The files. ---------------------------------------------------------------------------------


def _json(value: dict[str, Any]) -> bytes:
  return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _config_file(class_name: str, kwargs: dict[str, Any]) -> bytes:
  """A diffusers config file: `_class_name`, `_diffusers_version` and the kwargs."""
  return _json({"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **kwargs})


def _checked_state_dict(params: Params, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The UNet2DModel state dict of `params` (float32); one ConversionError if they do not fit."""
  params = jax.device_get(params)
  shapes = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(params, sep="/").items()}
  same = lambda _, shape: shape
  check("The params tree", config, shapes, lambda p: p, lambda p: p, same, same)
  state_dict = diffusers.to_diffusers_state_dict(params)
  return {k: v.astype(np.float32, copy=False) for k, v in state_dict.items()}


def diffusers_files(
  params: Params, config: ml_collections.ConfigDict, provenance: Provenance | None = None
) -> dict[str, bytes]:
  """{path in the directory: contents} of the export; raises ConversionError for a config field
  diffusers cannot express or params that do not fit the config."""
  unet = diffusers.unet2d_config(config)
  scheduler = diffusers.ddpm_scheduler_config(config)
  state_dict = _checked_state_dict(params, config)
  num_params = sum(v.size for v in state_dict.values())
  return {
    "README.md": model_card(config, num_params, provenance).encode(),
    "unet/config.json": _config_file("UNet2DModel", unet),
    WEIGHTS_FILE: safetensors.numpy.save(state_dict, metadata={"format": "pt"}),
    "scheduler/scheduler_config.json": _config_file("DDPMScheduler", scheduler),
    "model_index.json": _config_file(
      "DDPMPipeline",
      {"unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]},
    ),
  }


def check_output(directory: str, overwrite: bool) -> None:
  """Raises unless `directory` is absent, empty, or `overwrite` (nothing is written here)."""
  if not file_io.exists(directory):
    return
  if not file_io.isdir(directory):
    raise FileExistsError(f"--output={directory} is a file, not a directory; nothing was written.")
  if file_io.glob(directory, "*") and not overwrite:
    raise FileExistsError(
      f"--output={directory} is not empty; nothing was written. Pass --overwrite to replace "
      "an export there, or choose another --output."
    )


def to_diffusers(
  params: Params,
  config: ml_collections.ConfigDict,
  directory: str,
  *,
  overwrite: bool = False,
  provenance: Provenance | None = None,
) -> str:
  """Writes `params` (our U-Net's, fitting `config`) and the config's diffusion as a diffusers
  `DDPMPipeline` directory; returns its absolute path.

  Raises (before anything is written) ConversionError for a config field with no diffusers
  counterpart or params that do not fit the config, FileExistsError for a non-empty `directory`
  without `overwrite`.
  """
  directory = file_io.absolute(directory)
  files = diffusers_files(params, config, provenance)
  check_output(directory, overwrite)
  for name in FILES:
    file_io.write_atomically(os.path.join(directory, name), files[name])
  return directory


# -- A run: its config, checkpoint and metrics. -------------------------------------------------


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, `<workdir>/config.json` (over today's defaults, so a
  field added since reads its default)."""
  from ddpm_jax.config import defaults

  path = os.path.join(workdir, "config.json")
  if not file_io.exists(path):
    raise FileNotFoundError(
      f"{path} does not exist (--mode=train writes it). For a workdir without one, e.g. weights "
      "imported with --source, pass --config=FILE with the config of its weights."
    )
  try:
    values = json.loads(file_io.read_text(path))
    config = defaults.get_config()
    config.update(values)
  except (ValueError, TypeError, AttributeError) as e:
    raise ConversionError(f"{path} is not a readable config: {type(e).__name__}: {e}") from None
  return config


def read_params(
  workdir: str, config: ml_collections.ConfigDict, step: int | None = None, use_ema: bool = True
) -> tuple[Params, int]:
  """(numpy params, step) of checkpoint `step` (None: the latest) of the run: the EMA params, or
  the raw ones; nothing else of the train state is read, and nothing is changed on disk."""
  device = jax.local_devices()[0]
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
    ),
    model_bundle.abstract_params(config),
  )
  with readers.open_checkpoints(workdir) as ckpt:
    steps = ckpt.all_steps()
    if step is not None and step not in steps:
      raise readers.NoCheckpointError(
        f"No checkpoint of step {step} in {ckpt.directory}; available steps: {steps}. Pass "
        "--step with one of them, or leave it out for the latest."
      )
    step = steps[-1] if step is None else step
    which = "ema_params" if use_ema else "params"
    return jax.device_get(readers.restore_params(ckpt, abstract, step, which)), step


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    return json.loads(file_io.read_text(path)) if file_io.exists(path) else None
  except ValueError:
    return None  # A damaged metrics file is left out of the card, not an error.


def _quality(result: dict[str, Any]) -> str:
  text = f"FID {result['fid']:.3f}"
  if "inception_score" in result:
    text += f", IS {result['inception_score']:.2f} +- {result.get('inception_score_std', 0):.2f}"
  return f"{text} of {int(result.get('num_samples', 0)):,} samples"


def run_metrics(workdir: str, step: int, config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The measured metrics of the run's checkpoint `step` (EMA params), one line each: FID at the
  end of training, bits/dim of --mode=eval, FID of each --mode=sample/eval sample set."""
  lines = []
  fid_against = f"against the {config.eval.fid_split} split"
  if config.data.dataset == "digits":
    fid_against += " in the digits' own feature space, not Inception's"
  end = _read_json(os.path.join(workdir, "samples", f"step_{step:08d}_sample_quality.json"))
  if end and "fid" in end:
    lines.append(f"{_quality(end)} drawn at the end of training ({fid_against})")
  bpd = _read_json(os.path.join(workdir, f"eval_{step}", "bpd.json"))
  if bpd and "mean" in bpd:
    lines.append(
      f"{bpd['mean']:.4f} +- {bpd.get('stderr', 0):.4f} bits/dim on the {bpd.get('n', '?')} "
      f"images of the {bpd.get('split', '?')} split (the variational bound, all T terms)"
    )
  for directory in file_io.glob(workdir, f"samples_step{step}_*"):
    result = _read_json(os.path.join(directory, "sample_quality.json"))
    if result and "fid" in result:
      lines.append(f"{_quality(result)} {fid_against} ({os.path.basename(directory)})")
  return tuple(lines)


def export_run(
  workdir: str,
  directory: str,
  *,
  step: int | None = None,
  use_ema: bool = True,
  config: ml_collections.ConfigDict | None = None,
  overwrite: bool = False,
) -> tuple[str, int]:
  """Exports checkpoint `step` (None: the latest) of the run in `workdir` to `directory`;
  returns (directory, step). `config` defaults to the run's config.json. Raises (nothing
  written) as `to_diffusers`, and NoCheckpointError / CorruptCheckpointError for the checkpoint."""
  from ddpm_jax.config import validation

  workdir, directory = file_io.absolute(workdir), file_io.absolute(directory)
  config = run_config(workdir) if config is None else config
  validation.validate_config(config, mode="figures")  # The data, model and diffusion fields.
  diffusers.unet2d_config(config)  # No counterpart: say so before reading the checkpoint.
  diffusers.ddpm_scheduler_config(config)
  check_output(directory, overwrite)
  params, step = read_params(workdir, config, step, use_ema)
  provenance = Provenance(workdir, step, use_ema, run_metrics(workdir, step, config))
  return to_diffusers(params, config, directory, overwrite=overwrite, provenance=provenance), step


# -- The model card. ----------------------------------------------------------------------------


def _weights_lines(config: ml_collections.ConfigDict, provenance: Provenance | None) -> list[str]:
  if provenance is None:
    return ["- Exported with `ddpm_jax.convert.to_diffusers` from params given in Python."]
  kind = (
    f"the EMA of the parameters (decay {config.optim.ema_decay}), which every ddpm_jax mode "
    "samples from"
    if provenance.ema
    else "the raw parameters (not their EMA)"
  )
  # The run's name only: a model card is published, the path is the trainer's own.
  name = os.path.basename(provenance.workdir.rstrip("/"))
  return [f"- Step {provenance.step:,} of the run `{name}`: {kind}."]


def _training_lines(config: ml_collections.ConfigDict) -> list[str]:
  data, m, d, o, t = config.data, config.model, config.diffusion, config.optim, config.training
  flip = "random horizontal flips" if data.random_flip else "no flips"
  attention = ", ".join(f"{r}x{r}" for r in m.attn_resolutions)
  return [
    f"- Data: `{data.dataset}` ({data.image_size}x{data.image_size}x{data.num_channels}, "
    f"pixels scaled to [-1, 1], {flip}).",
    f"- U-Net: ch {m.ch}, ch_mult {tuple(m.ch_mult)}, {m.num_res_blocks} ResBlock(s) per level, "
    f"attention at {attention or 'no resolution'}, dropout {m.dropout}.",
    f"- Diffusion: T = {d.num_timesteps}, {d.beta_schedule} betas ({d.beta_start} to "
    f"{d.beta_end}), predicts {d.model_mean_type}, variance {d.model_var_type}, "
    f"loss {d.loss_type}.",
    f"- Optimizer: Adam, lr {o.lr} (warm-up {o.warmup_steps} steps), batch {t.batch_size}, "
    f"{t.num_train_steps:,} steps planned, gradient clipping {o.grad_clip}.",
  ]


def _metric_lines(provenance: Provenance | None) -> list[str]:
  if provenance is None or not provenance.metrics:
    return ["None recorded with these weights."]
  lines = [f"- {line}." for line in provenance.metrics]
  if not provenance.ema:
    lines.insert(0, "Measured on the run's EMA parameters, not on the raw ones exported here:")
  return lines


def _conditional_section(config: ml_collections.ConfigDict) -> list[str]:
  """How to sample a class-conditional model, which DDPMPipeline cannot (it passes no labels)."""
  n, w = config.model.num_classes, config.sample.guidance_scale
  if not n:
    return []
  code = (
    "eps_c = unet(x, t, class_labels=y).sample\n"
    f"eps_u = unet(x, t, class_labels=torch.full_like(y, {n})).sample\n"
    "eps = (1 + w) * eps_c - w * eps_u\n"
    "x = scheduler.step(eps, t, x).prev_sample"
  )
  return [
    f"## Class-conditional\n\nThe U-Net takes `class_labels` 0..{n - 1}, and {n} for the null "
    "class of classifier-free guidance (Ho & Salimans 2022), whose embedding is zero: the "
    "unconditional model. `DDPMPipeline` passes no labels, so sample with the U-Net and the "
    f"scheduler directly, with a guidance scale w (this run samples with w = {w:g}):\n\n"
    f"```python\n{code}\n```"
  ]


def model_card(
  config: ml_collections.ConfigDict, num_params: int, provenance: Provenance | None = None
) -> str:
  """README.md of the export: how to load it, the weights' step, the training setup, the
  measured metrics and the full config."""
  data, steps = config.data, config.diffusion.num_timesteps
  sections = [
    "---\nlibrary_name: diffusers\npipeline_tag: unconditional-image-generation\ntags:\n"
    "- ddpm\n- ddpm_jax\n- unconditional-image-generation\n---",
    f"# DDPM, {data.dataset} {data.image_size}x{data.image_size}, trained with ddpm_jax",
    f"A denoising diffusion probabilistic model (Ho, Jain, Abbeel 2020) of {num_params:,} "
    "parameters, trained in JAX with ddpm_jax and exported to diffusers: the U-Net as a "
    "`UNet2DModel`, the diffusion and its ancestral sampler as a `DDPMScheduler`.",
    "## Use\n\n```python\nfrom diffusers import DDPMPipeline\n\n"
    'pipe = DDPMPipeline.from_pretrained("path/to/this/directory")\n'
    f"images = pipe(batch_size=16, num_inference_steps={steps}).images  # PIL images\n```\n\n"
    f"`num_inference_steps={steps}` is the paper's sampler over all T steps. For fewer steps, "
    "`DDIMScheduler.from_config(pipe.scheduler.config)` reads the same schedule.",
    *_conditional_section(config),
    "## Weights\n\n" + "\n".join(_weights_lines(config, provenance)),
    "## Training\n\n" + "\n".join(_training_lines(config)),
    "## Metrics\n\n" + "\n".join(_metric_lines(provenance)),
    "## Config\n\nThe resolved ddpm_jax config of these weights:\n\n```json\n"
    + config.to_json_best_effort(indent=2, sort_keys=True)
    + "\n```",
  ]
  return "\n\n".join(sections) + "\n"
