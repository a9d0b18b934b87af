"""Networks: the DDPM U-Net and its timestep embedding."""

from ddpm_jax.models.layers import get_timestep_embedding
from ddpm_jax.models.unet import UNet

__all__ = ["UNet", "get_timestep_embedding"]
