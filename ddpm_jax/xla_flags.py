"""XLA:CPU settings measured faster for the U-Net, added to `XLA_FLAGS` before JAX starts.

jax 0.10's XLA:CPU runs each convolution through YNNPACK by default. For the U-Net's 3x3
convolutions its Eigen kernels are faster on CPU, most of all for the kernel gradient and
for few channels. On 2 Sapphire Rapids cores, with YNNPACK on -> off:
  * CIFAR-10 train step, batch 16: 1.4-1.5x (3.06 -> 4.67 and 3.55 -> 4.91 images/s in two full
    benchmark runs).
  * digits train step: -2% to +6%, within the noise.
  * digits sampling: +5-15% (20-step timings).
The README's "Performance" section has the details. The flag only changes XLA:CPU programs, so
GPU and TPU runs are untouched.

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

# name -> value: every convolution runs as an XLA (Eigen) convolution thunk, not a YNNPACK fusion.
CPU_FLAGS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}


def _flag_names(xla_flags: str) -> set[str]:
  """'--a=1 --b' -> {'a', 'b'}."""
  return {item.lstrip("-").partition("=")[0] for item in shlex.split(xla_flags)}


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
