"""Checks a config before anything is compiled; each problem is one message naming the field.

Each mode validates once, at its entry (`validate_config(config, mode=...)`): the fields every
mode reads (data, model, diffusion), then those of the mode.
"""

from __future__ import annotations

import ml_collections

from ddpm_jax import diffusion, solvers
from ddpm_jax.data.specs import DATA_SOURCES, DATASETS
from ddpm_jax.models.convolution import CONV_IMPLS

DTYPES = ("float32", "bfloat16")
MODES = ("train", "sample", "eval", "figures")


class ConfigError(ValueError):
  """A config field has a value ddpm_jax cannot run with."""


def _fail(field: str, value, allowed: str) -> None:
  raise ConfigError(f"config.{field}={value!r} is not allowed: {allowed}.")


def _value(config, field: str):
  section, name = field.split(".")
  return config[section][name]


def _check_choice(config, field: str, allowed) -> None:
  try:
    diffusion.check_choice(f"config.{field}", _value(config, field), tuple(allowed))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_positive(config, field: str) -> None:
  value = _value(config, field)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    _fail(field, value, "it must be an integer >= 1")


def _check_non_negative(config, field: str, integer: bool = True) -> None:
  value = _value(config, field)
  kinds = (int,) if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kinds) or not value >= 0:
    kind = "an integer" if integer else "a number"
    _fail(field, value, f"it must be {kind} >= 0 (0 disables it)")


def validate_config(
  config: ml_collections.ConfigDict,
  *,
  mode: str = "train",
  device_count: int = 1,
  process_count: int = 1,
) -> None:
  """Raises `ConfigError` for the first field that `mode` ('train', 'sample', 'eval',
  'figures') cannot run with; training also needs its batch to divide over `device_count`
  devices and `process_count` processes."""
  diffusion.check_choice("mode", mode, MODES)
  _check_model_and_data(config)
  if mode == "train":
    _check_training(config, device_count, process_count)
  if mode == "sample" or (mode == "eval" and config.eval.sample_quality):
    check_sampling(config)
  if mode == "eval":
    _check_eval(config)


def _check_model_and_data(config) -> None:
  _check_choice(config, "data.dataset", DATASETS)
  _check_choice(config, "data.source", DATA_SOURCES)
  _check_choice(config, "data.num_channels", (1, 3))
  _check_choice(config, "diffusion.beta_schedule", diffusion.BETA_SCHEDULES)
  _check_choice(config, "diffusion.model_mean_type", diffusion.MODEL_MEAN_TYPES)
  _check_choice(config, "diffusion.model_var_type", diffusion.MODEL_VAR_TYPES)
  _check_choice(config, "diffusion.loss_type", diffusion.LOSS_TYPES)
  _check_choice(config, "model.dtype", DTYPES)
  _check_choice(config, "model.param_dtype", DTYPES)
  _check_choice(config, "model.conv_impl", CONV_IMPLS)
  _check_positive(config, "diffusion.num_timesteps")
  _check_non_negative(config, "model.num_classes")
  _check_diffusion(config)
  _check_model(config)
  _check_conditioning(config)


def _check_training(config, device_count: int, process_count: int) -> None:
  for field in (
    "training.batch_size",
    "training.num_train_steps",
    "training.steps_per_call",
    "training.log_every",
    "training.keep_checkpoints",
  ):
    _check_positive(config, field)
  for field in (
    "training.checkpoint_every_steps",
    "training.sample_every",
    "training.num_sample_images",
    "training.fid_num_samples",
    "optim.warmup_steps",
  ):
    _check_non_negative(config, field)
  for field in ("training.checkpoint_every_secs", "optim.grad_clip"):
    _check_non_negative(config, field, integer=False)
  _check_optimizer(config)
  if not 0.0 <= config.training.label_dropout < 1.0:
    _fail("training.label_dropout", config.training.label_dropout, "it must be in [0, 1)")
  _check_batch(config, device_count, process_count)
  _check_step_multiples(config)


def check_sampling(config) -> None:
  """The fields of `config.sample` that `--mode=sample` (and the FID of `--mode=eval`) use."""
  for field in ("sample.num_samples", "sample.batch_size", "sample.num_steps"):
    _check_positive(config, field)
  _check_choice(config, "sample.sampler", solvers.SAMPLERS)
  sample, num_timesteps = config.sample, config.diffusion.num_timesteps
  if sample.sampler == "ddim" and sample.num_steps > num_timesteps:
    _fail(
      "sample.num_steps",
      sample.num_steps,
      f"DDIM uses at most the T={num_timesteps} steps of the diffusion",
    )
  if not sample.eta >= 0:
    _fail("sample.eta", sample.eta, "it must be >= 0")
  if sample.sampler in solvers.SOLVERS:
    _check_solver(config)
  if isinstance(sample.checkpoint_step, bool) or not isinstance(sample.checkpoint_step, int):
    _fail(
      "sample.checkpoint_step",
      sample.checkpoint_step,
      "it must be an integer (a step, or -1 for the latest)",
    )


def _check_conditioning(config) -> None:
  """The labels and the guidance every sampling mode (and training's samples) use."""
  num_classes, sample = config.model.num_classes, config.sample
  if not sample.guidance_scale >= 0:
    _fail("sample.guidance_scale", sample.guidance_scale, "it must be >= 0")
  if sample.guidance_scale and not num_classes:
    _fail(
      "sample.guidance_scale",
      sample.guidance_scale,
      "classifier-free guidance needs a class-conditional model (model.num_classes > 0)",
    )
  if not -1 <= sample.class_label < max(num_classes, 0):
    allowed = f"0..{num_classes - 1}, or " if num_classes else ""
    _fail(
      "sample.class_label",
      sample.class_label,
      f"it must be {allowed}-1 (each sample's label from its index); model.num_classes="
      f"{num_classes}",
    )


def _check_solver(config) -> None:
  """DPM-Solver++ and Heun: their fields, and a plan over the diffusion's noise levels."""
  sample = config.sample
  if sample.sampler == "dpm_solver":
    _check_choice(config, "sample.order", (1, 2, 3))
  _check_choice(config, "sample.spacing", solvers.SPACINGS)
  if sample.sampler == "heun" and config.diffusion.model_mean_type == "xprev":
    _fail(
      "sample.sampler",
      sample.sampler,
      "Heun needs the denoised x_0 at fractional times, which a model predicting x_{t-1} "
      "(diffusion.model_mean_type='xprev') cannot give; use dpm_solver, ddim or ancestral",
    )
  spec = solvers.SolverSpec(
    sample.sampler,
    sample.num_steps,
    int(sample.order),
    sample.spacing,
    sample.karras_sigmas,
    sample.lower_order_final,
  )
  try:
    spec.plan(diffusion.create_diffusion(**config.diffusion.to_dict()))
  except ValueError as e:
    message = f"config.sample ({sample.sampler}, num_steps={sample.num_steps}): {e}"
    raise ConfigError(message) from None


def _check_eval(config) -> None:
  _check_positive(config, "eval.batch_size")
  num = config.eval.num_examples
  if isinstance(num, bool) or not isinstance(num, int) or not (num == -1 or num >= 1):
    _fail("eval.num_examples", num, "it must be an integer >= 1, or -1 for the whole split")


def _check_diffusion(config) -> None:
  try:
    diffusion.create_diffusion(**config.diffusion.to_dict())
  except ValueError as e:
    raise ConfigError(f"config.diffusion: {e}") from None


def _check_batch(config, device_count: int, process_count: int) -> None:
  batch = config.training.batch_size
  if batch % device_count:
    _fail(
      "training.batch_size",
      batch,
      f"the global batch must divide evenly over the {device_count} devices",
    )
  if batch % process_count:
    _fail(
      "training.batch_size",
      batch,
      f"the global batch must divide evenly over the {process_count} processes",
    )
  shards = config.data.num_shards
  if shards < 0 or (shards and (shards % process_count or batch % shards)):
    _fail(
      "data.num_shards",
      shards,
      f"it must be 0 (one per process) or a multiple of the {process_count} processes that "
      f"divides training.batch_size={batch}",
    )


def _check_model(config) -> None:
  model, size = config.model, config.data.image_size
  levels = len(model.ch_mult)
  if levels < 1:
    _fail("model.ch_mult", model.ch_mult, "it needs at least one level")
  factor = 2 ** (levels - 1)
  if not isinstance(size, int) or size < factor or size % factor:
    _fail(
      "data.image_size",
      size,
      f"the U-Net with {levels} levels (model.ch_mult={tuple(model.ch_mult)}) halves it "
      f"{levels - 1} times, so it must be a positive multiple of {factor}",
    )
  for mult in model.ch_mult:
    if (model.ch * mult) % 32:
      _fail(
        "model.ch",
        model.ch,
        f"GroupNorm uses 32 groups, so model.ch * each of model.ch_mult "
        f"{tuple(model.ch_mult)} must be a multiple of 32",
      )
  resolutions = {size // 2**i for i in range(levels)}
  for res in model.attn_resolutions:
    if res not in resolutions:
      _fail(
        "model.attn_resolutions",
        tuple(model.attn_resolutions),
        f"each must be one of the U-Net's resolutions {sorted(resolutions)}",
      )
  if not 0.0 <= model.dropout < 1.0:
    _fail("model.dropout", model.dropout, "it must be in [0, 1)")


def _check_optimizer(config) -> None:
  optim = config.optim
  if not optim.lr > 0:
    _fail("optim.lr", optim.lr, "it must be > 0")
  for field in ("ema_decay", "beta1", "beta2"):
    if not 0.0 <= optim[field] < 1.0:
      _fail(f"optim.{field}", optim[field], "it must be in [0, 1)")
  if not optim.eps > 0:
    _fail("optim.eps", optim.eps, "it must be > 0")
  if config.training.sample_every and config.training.num_sample_images < 1:
    _fail(
      "training.num_sample_images",
      config.training.num_sample_images,
      "it must be >= 1 when training.sample_every is set",
    )


def _check_step_multiples(config) -> None:
  k = config.training.steps_per_call
  for field in ("log_every", "checkpoint_every_steps", "sample_every"):
    value = config.training[field]
    if value > 0 and value % k:
      _fail(
        f"training.{field}",
        value,
        f"it must be a multiple of training.steps_per_call={k} (0 disables it)",
      )
