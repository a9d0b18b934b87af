"""Our side of the benchmarks: the product's own train step, sampler and compiler, timed.

  python -m benchmarks.ours train --config=digits --batch=128 --steps=20
  python -m benchmarks.ours train --config=cifar10 --batch=16 --set=model.conv_impl=xla_matmul_grad
  python -m benchmarks.ours train --config=cifar10 --batch=16 --xla_default_flags
  python -m benchmarks.ours sample --config=digits --num_images=1000 --timed_steps=20
  python -m benchmarks.ours sample --config=digits --num_images=1000 --sampler=dpm_solver \
      --num_steps=20
  python -m benchmarks.ours compile --config=cifar10 --batch=16 --cache_dir=/tmp/jax_cache
  python -m benchmarks.ours memory_model --config=lsun_church --batch=16 --set=model.remat=True
  python -m benchmarks.ours memory --config=lsun_church --batch=16   # XLA's whole-step analysis

Each prints one JSON line, {"workload", "value", "unit", "settings"}, as its last stdout line (the
same format as `benchmarks.peer`). Every figure runs in its own process, so a compile is cold
unless --cache_dir holds an earlier one. The train step is `TrainProgram.train_step`, the very
program `--mode=train` runs, over all local devices (on one device, batch = per-device batch).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import flops
from benchmarks.common import load_config, print_result
from ddpm_jax import model_bundle, parallel, solvers
from ddpm_jax.runtime import compilation_cache, xla_flags
from ddpm_jax.sampling import samplers
from ddpm_jax.training.program import TrainProgram

Result = dict[str, Any]
WORKLOADS = ("train", "forward", "sample", "compile", "memory", "memory_model", "matmul_peak")


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> list[str]:
  """`section.field=value` strings applied with the field's own type (bools: True/False)."""
  for item in overrides:
    key, _, value = item.partition("=")
    section, field = key.split(".")
    old = config[section][field]
    config[section][field] = (value == "True") if isinstance(old, bool) else type(old)(value)
  return list(overrides)


def _settings(config: ml_collections.ConfigDict, **extra) -> dict[str, Any]:
  m = config.model
  return dict(
    **extra,
    device=jax.devices()[0].device_kind,
    num_devices=jax.device_count(),
    jax=jax.__version__,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    python=platform.python_version(),
    precision=m.dtype,
    conv_impl=m.conv_impl,
    remat=m.remat,
    image_shape=list(model_bundle.image_shape(config)),
    model=dict(
      ch=m.ch,
      ch_mult=list(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=list(m.attn_resolutions),
      dropout=m.dropout,
    ),
  )


def _inference_options() -> dict[str, str]:
  """The compiler options of the product's forward-only programs (samplers), on this backend."""
  return xla_flags.inference_compiler_options(jax.devices()[0].platform)


def _block(tree: Any) -> None:
  jax.block_until_ready(tree)


def _train_program(config: ml_collections.ConfigDict, batch: int):
  """(compiled step, state, global batch, lower+compile seconds) over all local devices."""
  config.training.batch_size = batch
  loop = TrainProgram(config)
  state = loop.init_fn()
  x0 = np.random.default_rng(0).uniform(-1, 1, (batch, *model_bundle.image_shape(config)))
  x = parallel.global_batch(x0.astype(np.float32), loop.mesh)
  start = time.perf_counter()
  compiled = loop.train_step(1).lower(state, x).compile()
  return compiled, state, x, time.perf_counter() - start


def _abstract_step_inputs(program: TrainProgram, batch: int) -> tuple[Any, jax.ShapeDtypeStruct]:
  """(state, x) as shapes with the train step's shardings: lowers it without allocating."""
  replicated = parallel.replicated(program.mesh)
  state = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
    jax.eval_shape(program.init_fn),
  )
  x = jax.ShapeDtypeStruct(
    (batch, *model_bundle.image_shape(program.config)),
    jnp.float32,
    sharding=parallel.batch_sharding(program.mesh),
  )
  return state, x


def _xla_flops(compiled: Any) -> float:
  """XLA's FLOP count of a compiled program (on GPU without the cuDNN convolutions); NaN where
  the backend gives none."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])
  except Exception as e:  # Cost analysis support differs between backends.
    print(f"No FLOP count from XLA's cost analysis: {e!r}", file=sys.stderr)
    return float("nan")


def model_flops_per_step(config: ml_collections.ConfigDict, batch: int) -> float:
  """The train step's model FLOPs per device (`benchmarks.flops`: convolutions and dots of its
  jaxpr, on any backend), with `model.remat` off so that remat's recomputation is not counted."""
  config = config.copy_and_resolve_references()
  config.model.remat = False
  config.training.batch_size = batch
  program = TrainProgram(config)
  return float(flops.model_flops(program.train_step(1), *_abstract_step_inputs(program, batch)))


def matmul_peak(dtype: str = "float32", n: int = 2048, iters: int = 10) -> Result:
  """This machine's measured matmul peak: [2n, n] x [n, n] in `dtype` (float32 accumulation)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (2 * n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  _block(mm(a, b))
  start = time.perf_counter()
  for _ in range(iters):
    out = mm(a, b)
  _block(out)
  seconds = (time.perf_counter() - start) / iters
  return dict(
    value=2 * 2 * n * n * n / seconds / 1e9,
    unit="GFLOP/s",
    settings=dict(
      shape=[2 * n, n, n], dtype=dtype, iters=iters, device=jax.devices()[0].device_kind
    ),
  )


def train_steps_per_s(
  config: ml_collections.ConfigDict, batch: int, steps: int, warmup: int
) -> Result:
  """Steps/s of the train step; also FLOPs per step and their rate, per device: XLA's count of
  the compiled step (what ran, remat's recomputation included) and the model FLOPs."""
  compiled, state, x, compile_s = _train_program(config, batch)
  for _ in range(warmup):
    state, metrics = compiled(state, x)
  _block(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, x)
  _block(metrics)
  seconds = (time.perf_counter() - start) / steps
  xla_flops = _xla_flops(compiled)
  model_flops = model_flops_per_step(config, batch)
  return dict(
    value=1 / seconds,
    unit="steps/s",
    settings=_settings(
      config,
      batch=batch,
      steps=steps,
      warmup_steps=warmup,
      images_per_s=batch / seconds,
      compile_s=compile_s,
      flops_per_step=xla_flops,
      achieved_gflops=xla_flops / seconds / 1e9,
      model_flops_per_step=model_flops,
      model_gflops_per_s=model_flops / seconds / 1e9,
      final_loss=float(metrics["loss"]),
    ),
  )


def forward_images_per_s(
  config: ml_collections.ConfigDict, batch: int, iters: int, warmup: int
) -> Result:
  """Images/s of the U-Net forward pass (eval mode) at `batch`."""
  model = model_bundle.create_model(config)
  shape = (batch, *model_bundle.image_shape(config))
  x = jax.random.uniform(jax.random.PRNGKey(0), shape, jnp.float32, -1, 1)
  t = jnp.arange(batch, dtype=jnp.int32) % config.diffusion.num_timesteps
  params = jax.jit(model.init)(jax.random.PRNGKey(config.training.seed), x[:1], t[:1])["params"]
  forward = jax.jit(
    lambda p, x, t: model.apply({"params": p}, x, t), compiler_options=_inference_options()
  )
  for _ in range(max(warmup, 1)):
    _block(forward(params, x, t))
  start = time.perf_counter()
  for _ in range(iters):
    out = forward(params, x, t)
  _block(out)
  seconds = (time.perf_counter() - start) / iters
  return dict(
    value=batch / seconds,
    unit="images/s",
    settings=_settings(
      config, batch=batch, iters=iters, warmup=warmup, compiler_options=_inference_options()
    ),
  )


def sampler_spec(
  sampler: str,
  num_steps: int,
  eta: float = 0.0,
  order: int = 2,
  spacing: str = "linspace",
  karras: bool = False,
) -> samplers.SamplerSpec:
  """The `--mode=sample` spec (clipped x_0) of a benchmark's sampler: ancestral (eta 1), ddim
  (eta), or the ODE solvers (`order`, dpm_solver only; `spacing`, `karras`; lower orders in the
  final steps), whose other fields keep their defaults as `SamplerSpec.from_config` leaves them."""
  if sampler == "ancestral":
    return samplers.SamplerSpec(sampler, num_steps, 1.0)
  if sampler == "ddim":
    return samplers.SamplerSpec(sampler, num_steps, eta)
  return samplers.SamplerSpec(
    sampler,
    num_steps,
    0.0,
    order=order if sampler == "dpm_solver" else 2,
    spacing=spacing,
    karras=karras,
  )


def seed_params(config: ml_collections.ConfigDict, model: Any) -> Any:
  """The U-Net's initial params as `--mode=train` draws them (`program.init_train_state` from
  `PRNGKey(training.seed)`): the weights `benchmarks.peer --seed_params` loads."""
  params_rng, _ = jax.random.split(jax.random.PRNGKey(config.training.seed))
  return jax.jit(lambda rng: model_bundle.init_params(model, config, rng))(params_rng)


def sample_images_per_s(
  config: ml_collections.ConfigDict,
  num_images: int,
  sampler: str,
  num_steps: int | None,
  timed_steps: int | None,
  eta: float,
  batch: int | None = None,
  max_seconds: float = 0.0,
  solver: dict[str, Any] | None = None,
) -> Result:
  """Images/s of `num_images` samples by the `--mode=sample` sampler, in batches of `batch`
  (default: all in one), after one untimed batch that compiles. With `max_seconds` > 0 it stops
  after the batch that crosses it and reports the rate of the images done (settings say how many).
  `solver`: `sampler_spec`'s order, spacing and karras (dpm_solver, heun).

  With `timed_steps` < T (ancestral, one batch), the same reverse step runs `timed_steps` times
  in the compiled loop and the chain's time is extrapolated to all T steps.
  """
  batch = min(batch or num_images, num_images)
  diffusion = model_bundle.create_diffusion(config)
  model = model_bundle.create_model(config)
  shape = (batch, *model_bundle.image_shape(config))
  params = seed_params(config, model)
  num_steps = num_steps or diffusion.num_timesteps
  spec = sampler_spec(sampler, num_steps, eta, **(solver or {}))
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(config.sample.seed), num_images))
  extrapolated, timed = None, num_images
  if timed_steps and sampler == "ancestral" and timed_steps < num_steps:

    def chain(params, x, rng):
      def model_fn(x, t):
        return model.apply({"params": params}, x, t)

      return diffusion.p_sample_loop_from(model_fn, x, timed_steps - 1, rng)

    run = jax.jit(chain, compiler_options=_inference_options())
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    compile_start = time.perf_counter()
    _block(run(params, x, keys[:batch]))  # Compiles; the loop length is static.
    compile_s = time.perf_counter() - compile_start
    start = time.perf_counter()
    _block(run(params, x, keys[:batch]))
    # One batch's chain, extrapolated to all T steps and to every batch.
    seconds = (time.perf_counter() - start) * num_steps / timed_steps * num_images / batch
    extrapolated = timed_steps
  else:
    mesh = parallel.make_mesh()
    sample_fn = samplers.make_sample_fn(diffusion, model, mesh, shape[1:], spec, batch)
    params = jax.device_put(params, parallel.replicated(mesh))
    compile_start = time.perf_counter()
    sample_fn(params, keys[:batch])
    compile_s = time.perf_counter() - compile_start  # Includes one full chain.
    start, timed = time.perf_counter(), 0
    for first in range(0, num_images, batch):
      images = sample_fn(params, keys[first : first + batch])
      if not np.isfinite(images).all():
        raise RuntimeError("non-finite samples")
      timed += len(images)
      if max_seconds and time.perf_counter() - start > max_seconds:
        break
    seconds = time.perf_counter() - start
  return dict(
    value=timed / seconds,
    unit="images/s",
    settings=_settings(
      config,
      num_images=num_images,
      num_images_timed=timed,
      batch=batch,
      sampler=sampler,
      num_steps=num_steps,
      eta=spec.eta,
      **_solver_settings(spec),
      extrapolated_from_steps=extrapolated,
      chain_seconds=seconds,
      first_call_s=compile_s,
      compiler_options=_inference_options(),
    ),
  )


def _solver_settings(spec: samplers.SamplerSpec) -> dict[str, Any]:
  if spec.sampler not in solvers.SOLVERS:
    return {}
  return dict(
    order=spec.order,
    spacing=spec.spacing,
    karras=spec.karras,
    lower_order_final=spec.lower_order_final,
    clip_denoised=spec.clip_denoised,
    nfe=spec.nfe,
  )


def compile_seconds(config: ml_collections.ConfigDict, batch: int, cache_dir: str) -> Result:
  """Seconds to lower and compile the train step in this (fresh) process; with `cache_dir`,
  through JAX's persistent cache (cold when it is empty, warm on a second start)."""
  entries_before = _count_files(cache_dir)
  if cache_dir:
    compilation_cache.enable(cache_dir, min_compile_secs=0.0)
  _, _, _, seconds = _train_program(config, batch)
  return dict(
    value=seconds,
    unit="s",
    settings=_settings(
      config,
      batch=batch,
      cache_dir=cache_dir or None,
      cache_entries_before=entries_before,
      cache_entries_after=_count_files(cache_dir),
    ),
  )


def _count_files(directory: str) -> int:
  if not directory or not os.path.isdir(directory):
    return 0
  return sum(len(files) for _, _, files in os.walk(directory))


def peak_memory_bytes(config: ml_collections.ConfigDict, batch: int) -> Result:
  """Peak device memory of the train step at per-device `batch`, from XLA's compiled memory
  analysis: arguments + outputs - donated (aliased) + temporaries. Compiled, never run."""
  config.training.batch_size = batch
  loop = TrainProgram(config)
  state, x = _abstract_step_inputs(loop, batch)
  start = time.perf_counter()
  compiled = loop.train_step(1).lower(state, x).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  parts = {
    name: int(getattr(mem, f"{name}_size_in_bytes"))
    for name in ("argument", "output", "alias", "temp", "generated_code")
  }
  peak = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
  return dict(
    value=peak,
    unit="bytes",
    settings=_settings(
      config,
      batch=batch,
      compile_s=compile_s,
      **{f"{k}_bytes": v for k, v in parts.items()},
      peak_gib=peak / 2**30,
      num_params=parallel.param_count(state.params),
    ),
  )


def _nbytes(tree: Any) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _largest_block_working_set(config: ml_collections.ConfigDict, batch: int) -> int:
  """XLA's compiled peak of one full-resolution up-path ResBlock's forward + backward (the
  largest rematerialised unit): its input concat(h, skip) [B, H, W, 2 ch] -> [B, H, W, ch]."""
  from ddpm_jax.models.layers import ResBlock

  m, size = config.model, config.data.image_size
  block = ResBlock(
    m.ch * m.ch_mult[0], m.dropout, m.conv_impl, jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
  )
  x = jax.ShapeDtypeStruct((batch, size, size, 2 * m.ch * m.ch_mult[0]), jnp.float32)
  temb = jax.ShapeDtypeStruct((batch, 4 * m.ch), jnp.float32)
  rng = jax.random.PRNGKey(0)
  params = jax.eval_shape(lambda x, e: block.init(rng, x, e, False), x, temb)

  def loss(params, x, temb):
    out = block.apply(params, x, temb, True, rngs={"dropout": rng})
    return jnp.sum(out.astype(jnp.float32))

  mem = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, temb).compile().memory_analysis()
  return int(
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
  )


def memory_model_bytes(config: ml_collections.ConfigDict, batch: int) -> Result:
  """Peak memory per device of the train step at per-device `batch`, modelled from its parts:
  train state (params, EMA, Adam moments) + gradients + the activations the forward pass keeps
  for the backward pass (JAX's saved residuals, which `model.remat` shrinks) + the largest
  rematerialised block's working set (XLA's compiled analysis). XLA:CPU's compiled analysis of
  the whole step does not show remat's savings (its scheduler hoists the recomputation; a
  20-layer MLP shows the same), while TPU and GPU schedulers do realise them."""
  from jax._src.ad_checkpoint import saved_residuals  # No public API returns them.

  config.training.batch_size = batch
  loop = TrainProgram(config)
  state = jax.eval_shape(loop.init_fn)
  shape = (batch, *model_bundle.image_shape(config))

  def loss(params, x, t):
    out = loop.model.apply(
      {"params": params}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(0)}
    )
    return jnp.mean(out)

  residuals = saved_residuals(
    loss,
    state.params,
    jax.ShapeDtypeStruct(shape, jnp.float32),
    jax.ShapeDtypeStruct((batch,), jnp.int32),
  )
  activations = sum(_nbytes(aval) for aval, why in residuals if "argument" not in why)
  parts = dict(
    train_state=_nbytes(state),
    gradients=_nbytes(state.params),
    saved_activations=activations,
    block_working_set=_largest_block_working_set(config, batch),
  )
  total = sum(parts.values())
  return dict(
    value=total,
    unit="bytes",
    settings=_settings(
      config,
      batch=batch,
      **{f"{k}_bytes": v for k, v in parts.items()},
      peak_gib=total / 2**30,
      method="state + gradients + saved residuals + largest block's compiled working set",
    ),
  )


def run_workload(args: argparse.Namespace) -> Result:
  config = load_config(args.config)
  overrides = apply_overrides(config, args.set)
  batch = args.batch or config.training.batch_size
  if args.workload == "train":
    result = train_steps_per_s(config, batch, args.steps, args.warmup)
  elif args.workload == "forward":
    result = forward_images_per_s(config, batch, args.steps, args.warmup)
  elif args.workload == "sample":
    result = sample_images_per_s(
      config,
      args.num_images,
      args.sampler,
      args.num_steps,
      args.timed_steps,
      args.eta,
      args.batch,
      args.max_seconds,
      dict(order=args.order, spacing=args.spacing, karras=args.karras),
    )
  elif args.workload == "compile":
    result = compile_seconds(config, batch, args.cache_dir)
  elif args.workload == "memory":
    result = peak_memory_bytes(config, batch)
  elif args.workload == "memory_model":
    result = memory_model_bytes(config, batch)
  else:
    result = matmul_peak(args.dtype, args.matmul_size)
  result["settings"].update(config=args.config, overrides=overrides)
  return {"workload": args.workload, **result}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.ours", description=__doc__.split("\n")[0])
  p.add_argument("workload", choices=WORKLOADS)
  p.add_argument("--config", default="digits", help="configs/<name>.py, e.g. digits or cifar10.")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="SECTION.FIELD=VALUE",
    help="Config override, e.g. model.conv_impl=xla_matmul_grad (repeatable).",
  )
  p.add_argument("--batch", type=int, default=None, help="Per-device batch (default: config's).")
  p.add_argument("--steps", type=int, default=10, help="Timed train steps / forward passes.")
  p.add_argument("--warmup", type=int, default=2, help="Untimed train steps / forward passes.")
  p.add_argument(
    "--num_images",
    type=int,
    default=16,
    help="sample: images, in batches of --batch (default: one batch).",
  )
  p.add_argument("--sampler", choices=samplers.SAMPLERS, default="ancestral")
  p.add_argument("--num_steps", type=int, default=None, help="sample: chain length (default T).")
  p.add_argument(
    "--timed_steps",
    type=int,
    default=None,
    help="sample (ancestral): run this many steps and extrapolate to T.",
  )
  p.add_argument("--eta", type=float, default=0.0, help="sample with ddim: eta.")
  p.add_argument("--order", type=int, default=2, help="sample with dpm_solver: 1, 2 or 3.")
  p.add_argument(
    "--spacing", default="linspace", help="sample with dpm_solver/heun: linspace | trailing."
  )
  p.add_argument(
    "--karras", action="store_true", help="sample with dpm_solver/heun: Karras et al.'s sigmas."
  )
  p.add_argument(
    "--max_seconds",
    type=float,
    default=0.0,
    help="sample: stop after the batch that crosses this many seconds (0: never).",
  )
  p.add_argument("--cache_dir", default="", help="compile: persistent cache directory.")
  p.add_argument("--dtype", default="float32", help="matmul_peak: float32 | bfloat16.")
  p.add_argument("--matmul_size", type=int, default=2048, help="matmul_peak: n of [2n,n]x[n,n].")
  p.add_argument(
    "--xla_default_flags",
    action="store_true",
    help="Leave XLA_FLAGS as it is (without runtime.xla_flags' CPU settings).",
  )
  return p


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  if not args.xla_default_flags:
    xla_flags.apply()  # The product's XLA:CPU settings, as `ddpm_jax.main` runs with.
  print_result(lambda: run_workload(args))


if __name__ == "__main__":
  main()
