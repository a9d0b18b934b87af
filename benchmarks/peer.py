"""The PyTorch peer of the benchmarks: diffusers' UNet2DModel and DDPM/DDIM/DPM-Solver++
schedulers with our architecture, batch and (with `params`) weights.

  python -m benchmarks.peer train --config=digits --batch=128 --steps=20 --warmup=3
  python -m benchmarks.peer forward --config=cifar10 --batch=64 --steps=10
  python -m benchmarks.peer sample --config=cifar10 --num_images=16 --sampler=ancestral \
      --timed_steps=20 --seed_params
  python -m benchmarks.peer sample --config=digits --num_images=1000 --sampler=dpm_solver \
      --num_steps=20 --seed_params

Each prints one JSON line, {"workload", "value", "unit", "settings"}, as its last stdout line.
torch and diffusers (extra `bench`) are imported inside the functions, so this module imports
without them; `available()` says whether they import. jax is imported only to build our
config's U-Net parameters (`seed_params`, the CLI's --seed_params) or to load `params`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from benchmarks.common import load_config, print_result

if TYPE_CHECKING:
  import ml_collections
  import torch

Result = dict[str, Any]
SAMPLERS = ("ancestral", "ddim", "dpm_solver")
WORKLOADS = ("train", "forward", "sample")
_VAR_TYPES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}
# DPM-Solver++'s settings as diffusers defaults them (and our `samplers.SamplerSpec`).
SOLVER_DEFAULTS = dict(order=2, spacing="linspace", karras=False, lower_order_final=True)


def available() -> bool:
  """Whether torch and diffusers import."""
  try:
    importlib.import_module("torch")
    importlib.import_module("diffusers")
  except ImportError:
    return False
  return True


# -- The model. ---------------------------------------------------------------------------------


def unet2d_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """diffusers `UNet2DModel` kwargs of the config's U-Net (google/ddpm-cifar10-32's fixed fields).

  Level i (resolution image_size / 2**i) is an Attn{Down,Up}Block2D when that resolution is in
  `attn_resolutions`; diffusers lists the up blocks from the bottom.
  """
  from ddpm_jax import model_bundle  # Imports jax, which starts no threads until it computes.

  m = config.model
  if not m.resamp_with_conv:
    raise ValueError(
      "diffusers' UNet2DModel resamples with convolutions only: "
      "model.resamp_with_conv must be True."
    )
  size, mults = config.data.image_size, tuple(m.ch_mult)
  attn = [size // 2**i in tuple(m.attn_resolutions) for i in range(len(mults))]
  return dict(
    sample_size=size,
    in_channels=config.data.num_channels,
    out_channels=model_bundle.model_out_channels(config),
    block_out_channels=tuple(m.ch * mult for mult in mults),
    layers_per_block=m.num_res_blocks,
    down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
    up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
    attention_head_dim=None,
    norm_eps=1e-6,
    resnet_time_scale_shift="default",
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    act_fn="silu",
    norm_num_groups=32,
    center_input_sample=False,
    dropout=float(m.dropout),
  )


def build_model(config: ml_collections.ConfigDict, params: Any = None) -> torch.nn.Module:
  """The config's U-Net as a diffusers UNet2DModel (float32, CPU, eval mode); with our flax
  `params` it holds those weights (loaded strictly), else torch's default init."""
  import diffusers
  import torch

  model = diffusers.UNet2DModel(**unet2d_config(config))
  if params is not None:
    from ddpm_jax.weights import diffusers

    state_dict = {k: torch.tensor(v) for k, v in diffusers.to_diffusers_state_dict(params).items()}
    model.load_state_dict(state_dict, strict=True)
  return model.eval()


def seed_params(config: ml_collections.ConfigDict) -> Any:
  """Our U-Net's initial params (numpy pytree), as `ddpm_jax.train_program.init_train_state`
  draws them (jitted) from `PRNGKey(config.training.seed)`; jax runs on the CPU."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp

  from ddpm_jax import model_bundle

  params_rng, _ = jax.random.split(jax.random.PRNGKey(config.training.seed))
  size, channels = config.data.image_size, config.data.num_channels
  x = jnp.zeros((1, size, size, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  model = model_bundle.create_model(config)
  init = jax.jit(lambda rng: model.init({"params": rng}, x, t, train=False)["params"])
  return jax.device_get(init(params_rng))


def make_scheduler(
  config: ml_collections.ConfigDict,
  sampler: str = "ancestral",
  num_steps: int | None = None,
  solver: dict[str, Any] | None = None,
):
  """DDPMScheduler (ancestral, all T steps; also the training noise), DDIMScheduler (timesteps
  0, k, 2k, .. for k = T // num_steps: diffusers' "leading" spacing, the one its DDIM step is
  consistent with) or DPMSolverMultistepScheduler (DPM-Solver++, `solver`: `SOLVER_DEFAULTS`'
  keys), with our linear betas and clipped x_0 (DPM-Solver++: thresholding at 1.0, which is
  clipping to [-1, 1] as our `clip_denoised` does)."""
  import diffusers

  d = config.diffusion
  if d.beta_schedule != "linear" or d.model_mean_type != "eps":
    raise ValueError(
      "The peer has the linear beta schedule and eps prediction only; got "
      f"{d.beta_schedule!r} and {d.model_mean_type!r}."
    )
  common = dict(
    num_train_timesteps=d.num_timesteps,
    beta_start=d.beta_start,
    beta_end=d.beta_end,
    beta_schedule="linear",
    prediction_type="epsilon",
  )
  if sampler == "ancestral":
    if d.model_var_type not in _VAR_TYPES:
      raise ValueError(f"The peer has fixed variances only, got {d.model_var_type!r}.")
    if num_steps not in (None, d.num_timesteps):
      raise ValueError(f"Ancestral sampling runs all {d.num_timesteps} steps, not {num_steps}.")
    scheduler = diffusers.DDPMScheduler(
      variance_type=_VAR_TYPES[d.model_var_type],
      clip_sample=True,
      timestep_spacing="leading",
      **common,
    )
  elif sampler == "ddim":
    scheduler = diffusers.DDIMScheduler(
      set_alpha_to_one=True, clip_sample=True, timestep_spacing="leading", **common
    )
  elif sampler == "dpm_solver":
    if num_steps is None:
      raise ValueError("dpm_solver needs num_steps.")
    s = {**SOLVER_DEFAULTS, **(solver or {})}
    # Our betas (not diffusers' float32 linspace), as tests/test_solvers.py holds ours equal to
    # this scheduler.
    common.update(trained_betas=_model_betas(config))
    scheduler = diffusers.DPMSolverMultistepScheduler(
      algorithm_type="dpmsolver++",
      solver_order=s["order"],
      timestep_spacing=s["spacing"],
      use_karras_sigmas=s["karras"],
      lower_order_final=s["lower_order_final"],
      thresholding=True,
      sample_max_value=1.0,
      **common,
    )
  else:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
  scheduler.set_timesteps(num_steps or d.num_timesteps)
  return scheduler


def _model_betas(config: ml_collections.ConfigDict) -> Any:
  """Our diffusion's float64 betas [T] (numpy)."""
  from ddpm_jax import model_bundle

  return model_bundle.create_diffusion(config).betas


# -- Timed workloads. ---------------------------------------------------------------------------


def _set_threads(threads: int | None) -> int:
  import torch

  torch.set_num_threads(threads or os.cpu_count() or 1)
  return torch.get_num_threads()


def _settings(
  config: ml_collections.ConfigDict, model: torch.nn.Module, threads: int, params: Any, **extra
) -> dict[str, Any]:
  """What it takes to reproduce a figure: sizes, library versions, threads, weights."""
  import diffusers
  import torch

  m = config.model
  return dict(
    **extra,
    threads=threads,
    device="cpu",
    precision="float32",
    torch=torch.__version__,
    diffusers=diffusers.__version__,
    python=platform.python_version(),
    image_shape=[config.data.num_channels, config.data.image_size, config.data.image_size],
    model=dict(
      ch=m.ch,
      ch_mult=list(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=list(m.attn_resolutions),
      dropout=m.dropout,
    ),
    num_params=sum(p.numel() for p in model.parameters()),
    weights="ours" if params is not None else "torch default init",
  )


def _timed(fn: Callable[[], Any], iters: int, warmup: int) -> tuple[float, Any]:
  """Seconds of `iters` calls of fn after `warmup` untimed ones, and the last call's result."""
  out = None
  for _ in range(warmup):
    out = fn()
  start = time.perf_counter()
  for _ in range(iters):
    out = fn()
  return time.perf_counter() - start, out


def train_steps_per_s(
  config: ml_collections.ConfigDict,
  batch: int,
  steps: int,
  warmup: int = 2,
  threads: int | None = None,
  params: Any = None,
  seed: int = 0,
) -> Result:
  """Training steps/s like ours on a fixed batch x_0 [B, C, H, W] in [-1, 1]: t ~ U{0..T-1},
  x_t by `add_noise`, MSE on eps (train mode, dropout), backward, grad-norm clip, Adam, EMA."""
  import torch
  import torch.nn.functional as F

  if steps < 1 or warmup < 0:
    raise ValueError(f"Need steps >= 1 and warmup >= 0, got {steps} and {warmup}.")
  threads = _set_threads(threads)
  torch.manual_seed(seed)
  model = build_model(config, params).train()
  scheduler = make_scheduler(config)
  o = config.optim
  weights = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.Adam(weights, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)
  ema = [p.detach().clone() for p in weights]
  g = torch.Generator().manual_seed(seed)
  size, channels = config.data.image_size, config.data.num_channels
  x0 = torch.rand((batch, channels, size, size), generator=g) * 2 - 1
  num_timesteps = config.diffusion.num_timesteps

  def step() -> torch.Tensor:
    t = torch.randint(0, num_timesteps, (batch,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(weights, o.grad_clip)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, weights, 1.0 - o.ema_decay)
    return loss.detach()

  seconds, loss = _timed(step, steps, warmup)
  value = steps / seconds
  return dict(
    value=value,
    unit="steps/s",
    settings=_settings(
      config,
      model,
      threads,
      params,
      batch=batch,
      steps=steps,
      warmup_steps=warmup,
      seconds=seconds,
      images_per_s=value * batch,
      final_loss=float(loss),
      optimizer=dict(
        name="Adam",
        foreach=True,
        lr=o.lr,
        betas=[o.beta1, o.beta2],
        eps=o.eps,
        grad_clip=o.grad_clip,
        ema_decay=o.ema_decay,
        lr_warmup="none (constant lr)",
      ),
      seed=seed,
    ),
  )


def forward_images_per_s(
  config: ml_collections.ConfigDict,
  batch: int,
  iters: int,
  warmup: int = 2,
  threads: int | None = None,
  params: Any = None,
  seed: int = 0,
) -> Result:
  """U-Net forward passes (eval mode, inference_mode) on x [B, C, H, W], t [B]: images/s."""
  import torch

  if iters < 1 or warmup < 0:
    raise ValueError(f"Need iters >= 1 and warmup >= 0, got {iters} and {warmup}.")
  threads = _set_threads(threads)
  torch.manual_seed(seed)
  model = build_model(config, params)
  g = torch.Generator().manual_seed(seed)
  size, channels = config.data.image_size, config.data.num_channels
  x = torch.randn((batch, channels, size, size), generator=g)
  t = torch.randint(0, config.diffusion.num_timesteps, (batch,), generator=g)
  with torch.inference_mode():
    seconds, out = _timed(lambda: model(x, t).sample, iters, warmup)
  return dict(
    value=batch * iters / seconds,
    unit="images/s",
    settings=_settings(
      config,
      model,
      threads,
      params,
      batch=batch,
      steps=iters,
      warmup_steps=warmup,
      seconds=seconds,
      output_abs_mean=float(out.abs().mean()),
      seed=seed,
    ),
  )


def _sampling_step(
  model: torch.nn.Module, scheduler: Any, sampler: str, eta: float, generator: torch.Generator
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
  """`step(x_t, t) -> x_{t'}`: one step of diffusers' pipeline loop (scale_model_input, the
  network, scheduler.step)."""
  # Ours recomputes eps from the clipped x_0, as diffusers' DDIM does with this flag.
  kwargs = dict(eta=eta, use_clipped_model_output=True) if sampler == "ddim" else {}

  def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    eps = model(scheduler.scale_model_input(x, t), t).sample
    return scheduler.step(eps, t, x, generator=generator, **kwargs).prev_sample

  return step


def sample_from(
  config: ml_collections.ConfigDict,
  x_T: torch.Tensor,
  sampler: str,
  num_steps: int | None = None,
  params: Any = None,
  eta: float = 0.0,
  solver: dict[str, Any] | None = None,
  seed: int = 0,
) -> torch.Tensor:
  """The samples x_0 [N, C, H, W] of the timed loop of `sample_images_per_s` from x_T
  [N, C, H, W], untimed (the benchmarks' check that both sides compute the same chain)."""
  import torch

  model = build_model(config, params)
  scheduler = make_scheduler(config, sampler, num_steps, solver)
  step = _sampling_step(model, scheduler, sampler, eta, torch.Generator().manual_seed(seed))
  x = x_T
  with torch.inference_mode():
    for t in scheduler.timesteps:
      x = step(x, t)
  return x


def sample_images_per_s(
  config: ml_collections.ConfigDict,
  num_images: int,
  sampler: str = "ancestral",
  num_steps: int | None = None,
  timed_steps: int | None = None,
  params: Any = None,
  eta: float = 0.0,
  threads: int | None = None,
  seed: int = 0,
  solver: dict[str, Any] | None = None,
) -> Result:
  """The pipeline loop (eps = unet(x, t); x = scheduler.step(eps, t, x)) on all num_images
  [N, C, H, W] at once: images/s of the full chain of num_steps (default: all T; DDIM: eta;
  DPM-Solver++: `solver`, `SOLVER_DEFAULTS`' keys).

  With timed_steps < num_steps only that many steps run (after one untimed warm-up step) and the
  chain's time is extrapolated as time per step * num_steps.
  """
  import torch

  threads = _set_threads(threads)
  torch.manual_seed(seed)
  model = build_model(config, params)
  scheduler = make_scheduler(config, sampler, num_steps, solver)
  timesteps = scheduler.timesteps
  num_steps = len(timesteps)
  run_steps = num_steps if timed_steps is None else min(timed_steps, num_steps)
  if run_steps < 1:
    raise ValueError(f"timed_steps must be >= 1, got {timed_steps}.")
  g = torch.Generator().manual_seed(seed)
  step = _sampling_step(model, scheduler, sampler, eta, g)
  size, channels = config.data.image_size, config.data.num_channels

  with torch.inference_mode():
    x = torch.randn((num_images, channels, size, size), generator=g)
    step(x.clone(), timesteps[0])  # Warm-up, untimed and discarded.
    scheduler.set_timesteps(num_steps)  # DPM-Solver++ keeps its past outputs: start afresh.
    start = time.perf_counter()
    for t in timesteps[:run_steps]:
      x = step(x, t)
    seconds = time.perf_counter() - start
  chain_seconds = seconds / run_steps * num_steps
  extra = {} if run_steps == num_steps else dict(extrapolated_from_steps=run_steps)
  if sampler == "dpm_solver":
    c = scheduler.config
    extra.update(
      algorithm_type=c.algorithm_type,
      solver_order=c.solver_order,
      timestep_spacing=c.timestep_spacing,
      use_karras_sigmas=c.use_karras_sigmas,
      lower_order_final=c.lower_order_final,
      thresholding=c.thresholding,
      sample_max_value=c.sample_max_value,
    )
  return dict(
    value=num_images / chain_seconds,
    unit="images/s",
    settings=_settings(
      config,
      model,
      threads,
      params,
      batch=num_images,
      sampler=sampler,
      num_steps=num_steps,
      steps=run_steps,
      warmup_steps=1,
      **extra,
      seconds=seconds,
      chain_seconds=chain_seconds,
      seconds_per_step=seconds / run_steps,
      eta=eta if sampler == "ddim" else None,
      scheduler=type(scheduler).__name__,
      timesteps=[int(timesteps[0]), int(timesteps[-1])],
      clip_sample=True,
      sample_abs_max=float(x.abs().max()),
      seed=seed,
    ),
  )


# -- Command line. ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.split("\n")[0])
  p.add_argument("workload", choices=WORKLOADS)
  p.add_argument("--config", required=True, help="configs/<name>.py, e.g. digits or cifar10.")
  p.add_argument(
    "--batch", type=int, default=None, help="train/forward batch (default: training.batch_size)."
  )
  p.add_argument("--steps", type=int, default=10, help="Timed train steps / forward passes.")
  p.add_argument("--warmup", type=int, default=2, help="Untimed train steps / forward passes.")
  p.add_argument("--num_images", type=int, default=16, help="sample: images, one batch.")
  p.add_argument("--sampler", choices=SAMPLERS, default="ancestral")
  p.add_argument(
    "--num_steps",
    type=int,
    default=None,
    help="sample: chain length (default T; ancestral always T).",
  )
  p.add_argument(
    "--timed_steps",
    type=int,
    default=None,
    help="sample: run only this many steps and extrapolate.",
  )
  p.add_argument("--eta", type=float, default=0.0, help="sample with ddim: eta.")
  p.add_argument("--order", type=int, default=2, help="sample with dpm_solver: 1, 2 or 3.")
  p.add_argument(
    "--spacing", default="linspace", help="sample with dpm_solver: linspace | trailing."
  )
  p.add_argument(
    "--karras", action="store_true", help="sample with dpm_solver: Karras et al.'s sigmas."
  )
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs).")
  p.add_argument("--seed", type=int, default=0, help="Inputs and torch's default init.")
  p.add_argument(
    "--seed_params",
    action="store_true",
    help="Use our U-Net's initial params (PRNGKey(training.seed)).",
  )
  return p


def run_workload(args: argparse.Namespace) -> Result:
  """One workload of the parsed command line -> its result dict with "workload"."""
  config = load_config(args.config)
  params = seed_params(config) if args.seed_params else None
  common = dict(threads=args.threads, params=params, seed=args.seed)
  batch = args.batch or config.training.batch_size
  if args.workload == "train":
    result = train_steps_per_s(config, batch, args.steps, args.warmup, **common)
  elif args.workload == "forward":
    result = forward_images_per_s(config, batch, args.steps, args.warmup, **common)
  else:
    result = sample_images_per_s(
      config,
      args.num_images,
      args.sampler,
      args.num_steps,
      args.timed_steps,
      eta=args.eta,
      solver=dict(order=args.order, spacing=args.spacing, karras=args.karras),
      **common,
    )
  result["settings"]["config"] = args.config
  return {"workload": args.workload, **result}


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  if not available():
    raise SystemExit("benchmarks.peer needs torch and diffusers (the `bench` extra).")
  print_result(lambda: run_workload(args))


if __name__ == "__main__":
  main()
