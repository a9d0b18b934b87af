"""Devices: the 1-D data mesh over every device of every process, its shardings, global arrays,
and padding a batch to the devices and back.

Every part (training, sampling, evaluation, checkpoints) lays its arrays out with these; the
per-device programs communicate over the mesh axis `AXIS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes), axis `AXIS`."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (params, train state)."""
  return NamedSharding(mesh, P())


def platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices: 'cpu', 'gpu' or 'tpu'."""
  return mesh.devices.flat[0].platform


def batch_sharding(mesh: Mesh, steps_per_call: int = 1) -> NamedSharding:
  """Rows split over the devices: `[B, ...]`, or `[K, B, ...]` for K > 1 steps per call."""
  return NamedSharding(mesh, P(None, AXIS) if steps_per_call > 1 else P(AXIS))


def global_batch(local_batch: np.ndarray, mesh: Mesh, steps_per_call: int = 1) -> jax.Array:
  """Assembles each process's `[B_local, ...]` (or `[K, B_local, ...]`) into one global array."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, steps_per_call), local_batch)


def shard_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """`[N, ...]`, the same on every process, as a global array whose rows split over the mesh
  (N a multiple of the device count)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda index: x[index])


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """`[n, ...]` (0 < n <= size) -> `[size, ...]`: rows n.. are copies of row n - 1, so padded
  inputs stay valid (keys, images) and every call has one shape."""
  x = np.asarray(x)
  if not 0 < x.shape[0] <= size:
    raise ValueError(f"Got {x.shape[0]} rows; expected 1 to {size}.")
  return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def pad_unpad(fn: Callable[..., Any], size: int) -> Callable[..., Any]:
  """`fn` of arrays `[size, ...]` as a function of arrays `[n, ...]`, 0 < n <= size: each input
  padded with `pad_rows`, each output leaf (`[size, ...]`) cut back to its first n rows."""

  def padded(*arrays: np.ndarray) -> Any:
    n = np.shape(arrays[0])[0]
    out = fn(*(pad_rows(x, size) for x in arrays))
    return jax.tree.map(lambda y: y[:n], out)

  return padded


def param_count(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
