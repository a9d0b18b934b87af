"""One run's model, for every mode: config -> diffusion, U-Net, mesh, image shape, and the EMA
params of a checkpoint.

Sampling, evaluation, the figures and the converter build a `ModelBundle`; the optimizer, the
train step and the input pipeline belong to training alone. The jitted code never reads the
config: these functions turn it into the objects it closes over.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import parallel
from ddpm_jax.models import UNet


def create_diffusion(config: ml_collections.ConfigDict) -> diffusion_lib.GaussianDiffusion:
  return diffusion_lib.create_diffusion(**config.diffusion.to_dict())


def model_out_channels(config: ml_collections.ConfigDict) -> int:
  """`model.out_ch`, or the image channels (doubled when the variance is learned)."""
  if config.model.out_ch:
    return config.model.out_ch
  learned = config.diffusion.model_var_type in diffusion_lib.LEARNED_VAR_TYPES
  return config.data.num_channels * (2 if learned else 1)


def create_model(config: ml_collections.ConfigDict) -> UNet:
  m = config.model
  return UNet(
    ch=m.ch,
    out_ch=model_out_channels(config),
    ch_mult=tuple(m.ch_mult),
    num_res_blocks=m.num_res_blocks,
    attn_resolutions=tuple(m.attn_resolutions),
    dropout=m.dropout,
    resamp_with_conv=m.resamp_with_conv,
    dtype=jnp.dtype(m.dtype),
    param_dtype=jnp.dtype(m.param_dtype),
    remat=m.remat,
    conv_impl=m.conv_impl,
    num_classes=m.num_classes,
  )


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the config's images."""
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


def init_params(model: UNet, config: ml_collections.ConfigDict, rng: jax.Array) -> Any:
  """Fresh U-Net params, initialised from `rng` with a batch of one."""
  x = jnp.zeros((1, *image_shape(config)), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if model.num_classes else None  # Creates the class embedding.
  return model.init({"params": rng}, x, t, train=False, y=y)["params"]


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """The U-Net params' shapes and dtypes (`jax.ShapeDtypeStruct`s); nothing is computed."""
  return jax.eval_shape(lambda: init_params(create_model(config), config, jax.random.PRNGKey(0)))


@dataclasses.dataclass(frozen=True)
class ModelBundle:
  """The diffusion, the U-Net and the mesh of a config, and the EMA params of its checkpoints."""

  config: ml_collections.ConfigDict
  diffusion: diffusion_lib.GaussianDiffusion
  model: UNet
  mesh: Mesh
  image_shape: tuple[int, int, int]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> ModelBundle:
    return cls(
      config,
      create_diffusion(config),
      create_model(config),
      mesh if mesh is not None else parallel.make_mesh(),
      image_shape(config),
    )

  def abstract_params(self) -> Any:
    """The params' shapes and dtypes, replicated over the mesh."""
    sharding = parallel.replicated(self.mesh)
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      abstract_params(self.config),
    )

  def load_ema_params(self, workdir: str, step: int | None = None) -> tuple[Any, int]:
    """(EMA params replicated over the mesh, their step) of checkpoint `step` (None or negative:
    the latest) in `<workdir>/checkpoints`, read-only; nothing of the optimizer is read."""
    from ddpm_jax.checkpoints import readers

    return readers.load_ema_params(workdir, self.abstract_params(), step)
