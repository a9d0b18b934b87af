"""JAX's persistent compilation cache: a restarted job - after preemption, or `--mode=sample`
after training - loads its compiled programs instead of compiling them again (`benchmarks/`
measures both; the README has the figures).
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
