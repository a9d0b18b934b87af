"""Builds the diffusion and the U-Net of a config; the jitted code never reads the config."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ddpm_jax import diffusion as diffusion_lib
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
  )


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.num_channels)
