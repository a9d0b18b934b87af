"""XLA:CPU settings for the U-Net, added to `XLA_FLAGS` before JAX starts.

jax 0.10's XLA:CPU runs each convolution through YNNPACK by default; `CPU_FLAGS` makes it run
them as Eigen convolution thunks instead, which are faster for the U-Net's 3x3 convolutions (the
README's "Performance" section has the measurements). The flags only change XLA:CPU programs, so
GPU and TPU runs are untouched.

Programs that run the network forward only (the samplers, the likelihood evaluation) compile
with `inference_compiler_options`, which also leaves out YNNPACK's reduction fusions: per
program, since the train step is faster with them.

`XLA_FLAGS` is read once, when JAX initialises its backends (the first `jax.devices()` or
computation), so `apply` must run before that. Any of these flags already in `XLA_FLAGS` is left
as the user set it; `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution`
keeps XLA's default.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import MutableMapping

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
# name -> value: every convolution runs as an XLA (Eigen) convolution thunk, not a YNNPACK fusion.
CPU_FLAGS: dict[str, str] = {YNN_FUSION_TYPE: "-individual_convolution"}
# YNNPACK's fusion types for programs that run the U-Net forward only (samplers, likelihood
# evaluation): its dots, without its reduction fusions, which take in the convolution and the
# element-wise ops before each GroupNorm's statistics and run them slower than XLA does; the train
# step keeps them. XLA's default is DOT, INDIVIDUAL_DOT, REDUCE and INDIVIDUAL_CONVOLUTION;
# CPU_FLAGS leaves out the last; compiler options take the full names of the types kept.
INFERENCE_YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def _flag_values(xla_flags: str) -> dict[str, str | None]:
  """'--a=1 --b' -> {'a': '1', 'b': None}."""
  items = (item.lstrip("-").partition("=") for item in shlex.split(xla_flags))
  return {name: value if sep else None for name, sep, value in items}


def _flag_names(xla_flags: str) -> set[str]:
  """'--a=1 --b' -> {'a', 'b'}."""
  return set(_flag_values(xla_flags))


def inference_compiler_options(platform: str, xla_flags: str | None = None) -> dict[str, str]:
  """`compiler_options` for `jax.jit` of a forward-only program on `platform`'s devices: on CPU,
  INFERENCE_YNN_FUSION_TYPES. Empty on other platforms, and where `xla_flags` (default: the
  XLA_FLAGS environment variable) sets the YNNPACK fusion types to anything but CPU_FLAGS' value:
  the user's own choice then holds for every program."""
  if platform != "cpu":
    return {}
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  ours = CPU_FLAGS[YNN_FUSION_TYPE]
  if _flag_values(flags).get(YNN_FUSION_TYPE, ours) != ours:
    return {}
  return {YNN_FUSION_TYPE: INFERENCE_YNN_FUSION_TYPES}


def with_cpu_flags(xla_flags: str) -> str:
  """`xla_flags` (an XLA_FLAGS string) plus each of CPU_FLAGS that it does not set already."""
  present = _flag_names(xla_flags)
  added = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if name not in present]
  return " ".join([xla_flags.strip(), *added]).strip()


def apply(environ: MutableMapping[str, str] = os.environ) -> str:
  """Sets environ["XLA_FLAGS"] to `with_cpu_flags` of its value; returns the new value.

  Call it before anything initialises JAX's backends (later, it reaches only child processes,
  and says so). Calling it again changes nothing.
  """
  environ["XLA_FLAGS"] = with_cpu_flags(environ.get("XLA_FLAGS", ""))
  if environ is os.environ and _backends_started():
    logging.warning("XLA_FLAGS set after JAX started its backends; this process keeps its own.")
  return environ["XLA_FLAGS"]


def _backends_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # No public API tells whether the backends exist yet.

  return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())
