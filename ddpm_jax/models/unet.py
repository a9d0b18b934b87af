"""The DDPM U-Net (Ho et al. 2020, Appendix B), a one-to-one port of diffusion_tf/models/unet.py.

Parameter paths mirror the original TF variable scopes, so an official checkpoint maps one to one.
Original name (under `model/`)            -> our path (in `params`)
  temb/dense{0,1}/{W,b}                   -> temb/dense{0,1}/{kernel,bias}      W [in, out]
  conv_in/{W,b}                           -> conv_in/{kernel,bias}              W [3, 3, in, out]
  down_{i}/block_{j}/{norm1,norm2}/{gamma,beta}
                                          -> down_{i}/block_{j}/{norm1,norm2}/{scale,bias}
  down_{i}/block_{j}/{conv1,conv2}/{W,b}  -> down_{i}/block_{j}/{conv1,conv2}/{kernel,bias}
  down_{i}/block_{j}/temb_proj/{W,b}      -> down_{i}/block_{j}/temb_proj/{kernel,bias}
  down_{i}/block_{j}/nin_shortcut/{W,b}   -> down_{i}/block_{j}/nin_shortcut/{kernel,bias} [in, out]
  down_{i}/attn_{j}/norm/{gamma,beta}     -> down_{i}/attn_{j}/norm/{scale,bias}
  down_{i}/attn_{j}/{q,k,v,proj_out}/{W,b}
                                          -> down_{i}/attn_{j}/{q,k,v,proj_out}/{kernel,bias}
  down_{i}/downsample/conv/{W,b}          -> down_{i}/downsample/conv/{kernel,bias}
  mid/{block_1,attn_1,block_2}/...        -> mid/{block_1,attn_1,block_2}/... (as above)
  up_{i}/block_{j}/..., up_{i}/attn_{j}/... (j < num_res_blocks + 1) -> same path
  up_{i}/upsample/conv/{W,b}              -> up_{i}/upsample/conv/{kernel,bias}
  norm_out/{gamma,beta}                   -> norm_out/{scale,bias}
  conv_out/{W,b}                          -> conv_out/{kernel,bias}
i.e. W -> kernel, b -> bias, gamma -> scale, beta -> bias; scopes are kept as they are. Kernel
layouts already agree (conv HWIO, dense/nin [in, out]). EMA copies (`.../ExponentialMovingAverage`)
map to the same paths in the EMA params.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import (
  AttnBlock,
  ClassEmbed,
  Downsample,
  ResBlock,
  TimestepEmbed,
  Upsample,
  conv3x3,
  group_norm,
)

Dtype = Any


def _res_block_cls(remat: bool) -> type[nn.Module]:
  """ResBlock, optionally rematerialised (same names and outputs; `train` is static)."""
  return nn.remat(ResBlock, static_argnums=(3,)) if remat else ResBlock


def _resample_cls(cls: type[nn.Module], remat: bool) -> type[nn.Module]:
  """Upsample / Downsample, optionally rematerialised: only its (smaller) input is kept."""
  return nn.remat(cls) if remat else cls


def _concat_block(
  mdl: nn.Module,
  h: jax.Array,
  skip: jax.Array,
  temb: jax.Array,
  *,
  train: bool,
  name: str,
  **block_fields,
) -> jax.Array:
  """The up path's ResBlock `name` (a child of `mdl`) on concat(h, skip) along channels."""
  block = ResBlock(**block_fields, name=name, parent=mdl)
  return block(jnp.concatenate([h, skip], axis=-1), temb, train)


def _output_head(
  mdl: nn.Module, h: jax.Array, out_ch: int, conv_impl: str, dtype: Dtype, param_dtype: Dtype
) -> jax.Array:
  """norm_out -> swish -> conv_out, as children `norm_out` and `conv_out` of `mdl`."""
  h = group_norm("norm_out", param_dtype, parent=mdl, with_swish=True)(h)
  return conv3x3(
    out_ch, "conv_out", dtype, param_dtype, init_scale=0.0, conv_impl=conv_impl, parent=mdl
  )(h)


class DownLevel(nn.Module):
  """One resolution of the down path (scope `down_{i}`): children block_j, attn_j, downsample.

  Returns the outputs to keep as skips: each block's (after its attention) and the downsample's.
  """

  out_ch: int
  num_res_blocks: int
  use_attn: bool
  downsample: bool
  dropout: float = 0.0
  resamp_with_conv: bool = True
  remat: bool = False
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, train: bool) -> list[jax.Array]:
    block_cls = _res_block_cls(self.remat)
    skips = []
    for j in range(self.num_res_blocks):
      h = block_cls(
        self.out_ch, self.dropout, self.conv_impl, self.dtype, self.param_dtype, name=f"block_{j}"
      )(h, temb, train)
      if self.use_attn:
        h = AttnBlock(self.dtype, self.param_dtype, name=f"attn_{j}")(h)
      skips.append(h)
    if self.downsample:
      h = _resample_cls(Downsample, self.remat)(
        self.resamp_with_conv, self.conv_impl, self.dtype, self.param_dtype, name="downsample"
      )(h)
      skips.append(h)
    return skips


class MidBlock(nn.Module):
  """The middle (scope `mid`): block_1, attn_1, block_2 at the lowest resolution."""

  dropout: float = 0.0
  remat: bool = False
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    block_cls = _res_block_cls(self.remat)
    args = (None, self.dropout, self.conv_impl, self.dtype, self.param_dtype)
    h = block_cls(*args, name="block_1")(h, temb, train)
    h = AttnBlock(self.dtype, self.param_dtype, name="attn_1")(h)
    return block_cls(*args, name="block_2")(h, temb, train)


class UpLevel(nn.Module):
  """One resolution of the up path (scope `up_{i}`): num_res_blocks + 1 blocks on concat(h, skip).

  `skips` is consumed from the end (the original's hs.pop()); children block_j, attn_j, upsample.
  """

  out_ch: int
  num_res_blocks: int
  use_attn: bool
  upsample: bool
  dropout: float = 0.0
  resamp_with_conv: bool = True
  remat: bool = False
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, h: jax.Array, skips: list[jax.Array], temb: jax.Array, train: bool
  ) -> jax.Array:
    for j in range(self.num_res_blocks + 1):
      block = functools.partial(
        _concat_block,
        train=train,
        out_ch=self.out_ch,
        dropout=self.dropout,
        conv_impl=self.conv_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"block_{j}",
      )
      # Rematerialised with the concatenation inside, so that h and the skip are what is kept,
      # not their concatenation (which is as large as both).
      h = (nn.remat(block) if self.remat else block)(self, h, skips.pop(), temb)
      if self.use_attn:
        h = AttnBlock(self.dtype, self.param_dtype, name=f"attn_{j}")(h)
    if self.upsample:
      h = _resample_cls(Upsample, self.remat)(
        self.resamp_with_conv, self.conv_impl, self.dtype, self.param_dtype, name="upsample"
      )(h)
    return h


class UNet(nn.Module):
  """The DDPM noise-prediction network: x [B, H, W, C] in [-1, 1], t int [B] -> [B, H, W, out_ch].

  Defaults are the CIFAR-10 model (35,746,307 parameters). `dtype` is the compute dtype (GroupNorm
  and the attention softmax stay float32) and the output is always float32. `remat` wraps every
  ResBlock, resampling layer and the output head in nn.remat: the backward pass recomputes their
  activations from their inputs (less memory, ~1/3 more compute; names and outputs unchanged).
  `conv_impl` picks how the 3x3 convolutions run (`convolution.CONV_IMPLS`, same outputs).
  Dropout is active only with train=True and then needs rngs={'dropout': key}.
  With `num_classes` > 0 the model is class-conditional: labels y [B] (0..num_classes - 1, or
  num_classes for the null class, which is the unconditional model) add a learned class
  embedding to the timestep embedding (`ClassEmbed`); y None is the null class too.
  """

  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  resamp_with_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  conv_impl: str = "xla"
  num_classes: int = 0

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, train: bool = False, y: jax.Array | None = None
  ) -> jax.Array:
    """x [B, H, W, C] float, t [B] int (0-based step), y [B] int or None -> float32
    [B, H, W, out_ch]."""
    if x.ndim != 4 or t.shape != (x.shape[0],):
      raise ValueError(f"expected x [B, H, W, C] and t [B], got {x.shape} and {t.shape}")
    if y is not None and (not self.num_classes or y.shape != t.shape):
      raise ValueError(
        f"labels y {y.shape} need a class-conditional UNet (num_classes={self.num_classes} > 0) "
        f"and one label per image [B = {x.shape[0]}]"
      )
    num_levels = len(self.ch_mult)
    if x.shape[1] % (2 ** (num_levels - 1)) or x.shape[2] % (2 ** (num_levels - 1)):
      raise ValueError(
        f"image size {x.shape[1]}x{x.shape[2]} must be divisible by 2**{num_levels - 1} "
        f"for ch_mult={tuple(self.ch_mult)}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blocks_kw = dict(
      num_res_blocks=self.num_res_blocks,
      dropout=self.dropout,
      resamp_with_conv=self.resamp_with_conv,
      remat=self.remat,
      conv_impl=self.conv_impl,
      **kw,
    )

    temb = TimestepEmbed(self.ch, name="temb", **kw)(t)
    if y is not None:
      temb = temb + ClassEmbed(self.num_classes, 4 * self.ch, self.param_dtype, name="class_embed")(
        y
      ).astype(temb.dtype)

    h = conv3x3(self.ch, "conv_in", self.dtype, self.param_dtype, conv_impl=self.conv_impl)(x)
    skips = [h]
    for i in range(num_levels):
      skips += DownLevel(
        self.ch * self.ch_mult[i],
        use_attn=skips[-1].shape[1] in self.attn_resolutions,
        downsample=i != num_levels - 1,
        name=f"down_{i}",
        **blocks_kw,
      )(skips[-1], temb, train)

    h = MidBlock(self.dropout, self.remat, self.conv_impl, name="mid", **kw)(skips[-1], temb, train)

    for i in reversed(range(num_levels)):
      h = UpLevel(
        self.ch * self.ch_mult[i],
        use_attn=h.shape[1] in self.attn_resolutions,
        upsample=i != 0,
        name=f"up_{i}",
        **blocks_kw,
      )(h, skips, temb, train)
    assert not skips, "every skip connection must be consumed"

    head = nn.remat(_output_head, static_argnums=(2, 3, 4, 5)) if self.remat else _output_head
    h = head(self, h, self.out_ch, self.conv_impl, self.dtype, self.param_dtype)
    return h.astype(jnp.float32)
