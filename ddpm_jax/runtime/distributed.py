"""Multi-host setup: `jax.distributed.initialize` when the run spans several processes."""

from __future__ import annotations

import logging
import os

import jax


def _in_multi_process_cluster() -> bool:
  """True on a multi-worker TPU slice or inside a multi-task SLURM / Open MPI job."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in tpu_hosts:
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def maybe_initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Connects the processes of a multi-host run; a single-process run needs nothing.

  Explicit arguments (the launcher's `--coordinator_address` etc.) win; otherwise JAX detects
  TPU pods, SLURM and Open MPI from the environment.
  """
  if coordinator_address:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  elif _in_multi_process_cluster():
    jax.distributed.initialize()
  else:
    return
  logging.info(
    "Process %d of %d, %d local of %d devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
