"""Sampling over every device: each device runs the reverse chain on its share of the keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.train_step import AXIS


def sample_keys(rng: jax.Array, start: int, count: int) -> jax.Array:
  """Keys `[count, 2]` for global sample indices start..start+count-1: sample i depends only on
  (rng, i), never on the batch or device it is drawn on."""
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(start, start + count))


def make_sampler(
    diffusion: GaussianDiffusion,
    model: nn.Module,
    mesh: Mesh,
    image_shape: tuple[int, int, int],
    clip_denoised: bool = True,
) -> Callable[[Any, jax.Array], np.ndarray]:
  """Returns `sample(params, keys [N, 2]) -> images [N, H, W, C]` in [-1, 1] (float32 numpy).

  The N chains are spread over the mesh; N need not divide the device count (keys are padded).
  """

  def per_device(params, keys):
    def model_fn(x, t):
      return model.apply({"params": params}, x, t, train=False)

    shape = (keys.shape[0], *image_shape)
    return diffusion.p_sample_loop(model_fn, shape, keys, clip_denoised)

  mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)),
                                 out_specs=P(AXIS)))
  devices = mesh.devices.size

  def sample(params, keys):
    n = keys.shape[0]
    padded = -(-n // devices) * devices
    keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], padded - n, axis=0)])
    keys = jax.device_put(keys, NamedSharding(mesh, P(AXIS)))
    images = mapped(params, keys)
    return np.asarray(jax.experimental.multihost_utils.process_allgather(images, tiled=True))[:n]

  return sample
