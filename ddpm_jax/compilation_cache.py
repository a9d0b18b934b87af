"""JAX's persistent compilation cache: a second start reuses the compiled train step.

Compiling the CIFAR-10 train step takes ~15-20 s on 2 CPU cores (minutes for the 256x256 models
on some backends); with the cache, a restarted job - after preemption, or `--mode=sample` after
training - loads the executable instead (benchmarks/ measures both).
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = "~/.cache/ddpm_jax/jax_cache"


def enable(directory: str = DEFAULT_DIR, min_compile_secs: float = 1.0) -> str | None:
  """Caches every compilation that took at least `min_compile_secs` under `directory` (local or
  gs://). An empty `directory` leaves the cache off. Returns the directory used, or None."""
  if not directory:
    return None
  if "://" not in directory:
    directory = os.path.abspath(os.path.expanduser(directory))
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  return directory
