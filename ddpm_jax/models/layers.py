"""Building blocks of the DDPM U-Net (Ho et al. 2020, Appendix B), mirroring diffusion_tf/nn.py.

Every layer takes the compute `dtype` and the storage `param_dtype`; GroupNorm statistics and the
attention softmax always run in float32. Module and parameter names follow the original TF scopes
(see `ddpm_jax.models.unet` for the full mapping).
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import convolution
from ddpm_jax.models.convolution import varying_like
from ddpm_jax.models.dropout import Dropout

Dtype = Any


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int) -> jax.Array:
  """Sinusoidal timestep embedding, as in tensor2tensor / the original code.

  freq_i = exp(-i ln(10000) / (half - 1)) for i < half = embedding_dim // 2; the result is
  [sin(t freq), cos(t freq)] (sin first), zero-padded by one column when embedding_dim is odd.

  Args:
    timesteps: integer or float timesteps, [B].
    embedding_dim: output width D (needs D // 2 >= 2).
  Returns:
    float32 [B, D].
  """
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must have shape [B], got {timesteps.shape}")
  half_dim = embedding_dim // 2
  if half_dim < 2:
    raise ValueError(f"embedding_dim must be at least 4, got {embedding_dim}")
  scale = math.log(10000) / (half_dim - 1)
  freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -scale)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def swish(x: jax.Array) -> jax.Array:
  """The paper's nonlinearity, x * sigmoid(x)."""
  return nn.swish(x)


def default_init(scale: float = 1.0) -> jax.nn.initializers.Initializer:
  """TF1 variance_scaling(scale, 'fan_avg', 'uniform'); scale 0 means 1e-10 as in the original."""
  return jax.nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


# XLA:CPU reduces over non-minor axes at a few GB/s unless YNNPACK's reduction fusions are on
# (the train step has them; forward-only programs leave them out, `runtime.xla_flags`). GroupNorm's
# statistics of 16x16 to 32x32 maps (batch x positions <= 16 x 32 x 32) then run 2.4-4x faster as
# matrix-vector products (0.7-1.6x under YNNPACK's reductions); larger inputs reduce (README).
MATVEC_MEAN_MIN_POSITIONS = 16 * 16
MATVEC_MEAN_MAX_ELEMENTS = 16 * 32 * 32  # batch x positions


def _mean_by_reduction(v: jax.Array) -> jax.Array:
  return jnp.mean(v, axis=tuple(range(1, v.ndim - 1)))


def _mean_by_matvec(v: jax.Array) -> jax.Array:
  """[B, ..., C] -> [B, C] as the batched product ones [B, 1, N] v [B, N, C] / N."""
  batch, channels = v.shape[0], v.shape[-1]
  positions = math.prod(v.shape[1:-1])
  total = jax.lax.dot_general(
    jnp.ones((batch, positions), v.dtype),
    v.reshape(batch, positions, channels),
    (((1,), (1,)), ((0,), (0,))),
    precision=jax.lax.Precision.HIGHEST,
  )
  return total / positions


def spatial_mean(v: jax.Array) -> jax.Array:
  """Each example's per-channel mean over the spatial axes of v [B, ..., C] -> [B, C]: on CPU
  for the sizes above as a matrix-vector product, otherwise (and on other platforms) a reduction.
  """
  positions = math.prod(v.shape[1:-1])
  if not MATVEC_MEAN_MIN_POSITIONS <= positions <= MATVEC_MEAN_MAX_ELEMENTS // v.shape[0]:
    return _mean_by_reduction(v)
  return jax.lax.platform_dependent(v, cpu=_mean_by_matvec, default=_mean_by_reduction)


def _group_mean(v: jax.Array, num_groups: int) -> jax.Array:
  """Each example's mean over each group's positions and channels of v [B, ..., C], broadcast
  back over the group's channels as [B, 1.., C]: per-channel spatial means, then group means."""
  batch, channels = v.shape[0], v.shape[-1]
  spatial = tuple(range(1, v.ndim - 1))
  per_channel = spatial_mean(v).reshape(batch, num_groups, channels // num_groups)
  means = jnp.repeat(jnp.mean(per_channel, axis=-1), channels // num_groups, axis=-1)
  return means.reshape(batch, *(1,) * len(spatial), channels)


def _group_stats(x: jax.Array, num_groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """Each example's group mean and 1/std (two-pass variance) of float32 x [B, ..., C], as
  [B, 1.., C]."""
  mean = _group_mean(x, num_groups)
  centred = x - mean
  return mean, jax.lax.rsqrt(_group_mean(centred * centred, num_groups) + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_fn(
  x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float
) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over each example's groups, float32 [B, ..., C].

  The backward pass keeps only x and the [B, C] statistics (autodiff would keep x - mean and
  its normalised copy too) and is the closed form
  dx = rstd (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)), dxhat = g scale.
  """
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _normalise(x, scale, bias, mean, rstd):
  """(x - mean) rstd scale + bias: the normalised x, z."""
  return (x - mean) * rstd * scale + bias


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
  mean, rstd = _group_stats(x, num_groups, epsilon)
  return _normalise(x, scale, bias, mean, rstd), (x, scale, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, residuals, g):
  x, scale, mean, rstd = residuals
  xhat = (x - mean) * rstd
  reduce_axes = tuple(range(x.ndim - 1))
  d_scale = jnp.sum(g * xhat, axis=reduce_axes)
  d_bias = jnp.sum(g, axis=reduce_axes)
  dxhat = g * scale
  dx = rstd * (
    dxhat - _group_mean(dxhat, num_groups) - xhat * _group_mean(dxhat * xhat, num_groups)
  )
  return dx, d_scale, d_bias


group_norm_fn.defvjp(_group_norm_fwd, _group_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_swish_fn(
  x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float
) -> jax.Array:
  """swish(group_norm_fn(x, scale, bias)), float32 [B, ..., C], with one backward pass for both.

  It keeps x and the [B, C] statistics, as group_norm_fn, and not the normalised z that swish's
  own backward would keep: the backward recomputes z = xhat scale + bias and passes
  dz = g sigmoid(z) (1 + z (1 - sigmoid(z))) through group_norm_fn's closed form.
  """
  return swish(group_norm_fn(x, scale, bias, num_groups, epsilon))


def _group_norm_swish_fwd(x, scale, bias, num_groups, epsilon):
  z, (x, scale, mean, rstd) = _group_norm_fwd(x, scale, bias, num_groups, epsilon)
  return swish(z), (x, scale, bias, mean, rstd)


def _group_norm_swish_bwd(num_groups, epsilon, residuals, g):
  x, scale, bias, mean, rstd = residuals
  z = _normalise(x, scale, bias, mean, rstd)
  sigmoid = jax.nn.sigmoid(z)
  dz = g * sigmoid * (1 + z * (1 - sigmoid))
  return _group_norm_bwd(num_groups, epsilon, (x, scale, mean, rstd), dz)


group_norm_swish_fn.defvjp(_group_norm_swish_fwd, _group_norm_swish_bwd)


class GroupNorm(nn.Module):
  """GroupNorm over [B, ..., C] in float32 with params `scale` and `bias` [C], as nn.GroupNorm.

  The same maths as tf.contrib.layers.group_norm (two-pass variance over each group's spatial
  positions and channels), written as per-channel spatial means followed by means over each
  group's channels, with a closed-form backward pass (`group_norm_fn`) that keeps less for the
  backward than nn.GroupNorm's [B, H, W, G, C/G] reductions.
  With `with_swish` it returns swish(norm(x)) through one custom VJP (`group_norm_swish_fn`),
  whose backward pass keeps x alone rather than also the normalised activations.
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  param_dtype: Dtype = jnp.float32
  with_swish: bool = False  # swish(norm(x)) in one custom VJP (group_norm_swish_fn).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", jax.nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param("bias", jax.nn.initializers.zeros, (channels,), self.param_dtype)
    x = x.astype(jnp.float32)
    scale, bias = (varying_like(p.astype(jnp.float32), x) for p in (scale, bias))
    fn = group_norm_swish_fn if self.with_swish else group_norm_fn
    return fn(x, scale, bias, self.num_groups, self.epsilon)


def group_norm(
  name: str, param_dtype: Dtype, parent: Any = None, with_swish: bool = False
) -> GroupNorm:
  """GroupNorm(32 groups, eps 1e-6) computed in float32 (tf.contrib.layers.group_norm), followed
  by swish when `with_swish`."""
  kw = {} if parent is None else {"parent": parent}
  return GroupNorm(32, 1e-6, param_dtype, with_swish, name=name, **kw)


class Conv3x3(nn.Module):
  """3x3 convolution [B, H, W, C] -> [B, H', W', features]: kernel [3, 3, C, features] (HWIO)
  and a zero-initialised bias, like nn.Conv, computed by `convolution.conv3x3(impl=...)`. With
  `upsample`, of x upsampled x2 (nearest) first: [B, 2H, 2W, features] (`upsample_conv3x3`)."""

  features: int
  strides: int = 1
  padding: Any = ((1, 1), (1, 1))  # "SAME" for stride 1.
  init_scale: float = 1.0
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  upsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel", default_init(self.init_scale), (3, 3, x.shape[-1], self.features), self.param_dtype
    )
    bias = self.param("bias", jax.nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.upsample:
      y = convolution.upsample_conv3x3(x, kernel, self.conv_impl)
    else:
      y = convolution.conv3x3(x, kernel, self.strides, self.padding, self.conv_impl)
    return y + bias


def conv3x3(
  features: int,
  name: str,
  dtype: Dtype,
  param_dtype: Dtype,
  init_scale: float = 1.0,
  strides: int = 1,
  padding: Any = ((1, 1), (1, 1)),
  conv_impl: str = "xla",
  parent: Any = None,
  upsample: bool = False,
) -> Conv3x3:
  """The 3x3 convolution `name` (a child of `parent` if given); see `Conv3x3`."""
  kw = {} if parent is None else {"parent": parent}
  return Conv3x3(
    features,
    strides,
    padding,
    init_scale,
    conv_impl,
    dtype,
    param_dtype,
    upsample,
    name=name,
    **kw,
  )


@jax.custom_vjp
def dense_fn(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., in] @ kernel [in, out] -> [..., out], every dot on 2-D operands.

  nn.Dense's kernel gradient contracts B, H and W of two [B, H, W, C] arrays at once, and
  XLA:CPU feeds it a copy of one of them transposed to [C, BHW], written by the fusion that
  produces it at well under 1 GB/s. Here both gradients are dots of the flattened [N, C] arrays,
  which need no copy; the backward pass keeps x and the kernel, as autodiff of nn.Dense does.
  """
  return _dense_2d(x, kernel)


def _dense_2d(x, kernel):
  return jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])


def _dense_fwd(x, kernel):
  return _dense_2d(x, kernel), (x, kernel)


def _dense_bwd(residuals, g):
  x, kernel = residuals
  g2 = g.reshape(-1, g.shape[-1])  # [N, out]
  d_x = jnp.dot(g2, kernel.T).reshape(x.shape)
  d_kernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g2, (((0,), (0,)), ((), ())))
  return d_x, d_kernel.astype(kernel.dtype)


dense_fn.defvjp(_dense_fwd, _dense_bwd)


class Dense(nn.Module):
  """Dense over the last axis, x [..., in] -> [..., features]: nn.Dense's parameters (kernel
  [in, features], bias) and maths, computed by `dense_fn` with 2-D dots of x flattened to
  [N, in] (no transposed copies of 4-D arrays in the backward pass)."""

  features: int
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel", default_init(self.init_scale), (x.shape[-1], self.features), self.param_dtype
    )
    bias = self.param("bias", jax.nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return dense_fn(x, varying_like(kernel, x)) + bias


def dense(
  features: int, name: str, dtype: Dtype, param_dtype: Dtype, init_scale: float = 1.0
) -> Dense:
  """Dense over the last axis, kernel [in, out]; also the original's 1x1 `nin` layers."""
  return Dense(features, init_scale, dtype, param_dtype, name=name)


class TimestepEmbed(nn.Module):
  """t [B] int -> embedding [B, 4 ch]: sinusoid(ch) -> dense0 -> swish -> dense1."""

  ch: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    temb = get_timestep_embedding(t, self.ch)
    temb = dense(4 * self.ch, "dense0", self.dtype, self.param_dtype)(temb)
    return dense(4 * self.ch, "dense1", self.dtype, self.param_dtype)(swish(temb))


class ClassEmbed(nn.Module):
  """y [B] int in 0..num_classes -> [B, features]: a learned vector per class (`embedding`
  [num_classes, features], diffusers' `class_embedding` without its null row), and zero for
  y = num_classes, the null class of classifier-free guidance, so that the null class is exactly
  the unconditional model."""

  num_classes: int
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    table = self.param(
      "embedding", nn.initializers.normal(1.0), (self.num_classes, self.features), self.param_dtype
    )
    known = (y < self.num_classes)[:, None]
    return jnp.where(known, table[jnp.minimum(y, self.num_classes - 1)], 0.0).astype(jnp.float32)


class ResBlock(nn.Module):
  """Residual block: x [B, H, W, C], temb [B, E] -> [B, H, W, out_ch].

  h = conv1(swish(norm1(x))) + temb_proj(swish(temb)); h = conv2(dropout(swish(norm2(h))));
  x goes through a 1x1 `nin_shortcut` when C != out_ch. conv2 starts near zero (scale 1e-10).
  """

  out_ch: int | None = None
  dropout: float = 0.0
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    in_ch = x.shape[-1]
    out_ch = in_ch if self.out_ch is None else self.out_ch
    h = group_norm("norm1", self.param_dtype, with_swish=True)(x)
    h = conv3x3(out_ch, "conv1", self.dtype, self.param_dtype, conv_impl=self.conv_impl)(h)
    h = h + dense(out_ch, "temb_proj", self.dtype, self.param_dtype)(swish(temb))[:, None, None, :]
    h = group_norm("norm2", self.param_dtype, with_swish=True)(h)
    h = Dropout(self.dropout, deterministic=not train)(h)
    h = conv3x3(
      out_ch, "conv2", self.dtype, self.param_dtype, init_scale=0.0, conv_impl=self.conv_impl
    )(h)
    if in_ch != out_ch:
      x = dense(out_ch, "nin_shortcut", self.dtype, self.param_dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions with a residual: [B, H, W, C] -> same.

  q, k, v = 1x1 layers of norm(x); w = softmax_keys(q.k / sqrt(C)) (float32); x + proj_out(w v).
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = group_norm("norm", self.param_dtype)(x)
    q = dense(c, "q", self.dtype, self.param_dtype)(h).reshape(b, height * width, c)
    k = dense(c, "k", self.dtype, self.param_dtype)(h).reshape(b, height * width, c)
    v = dense(c, "v", self.dtype, self.param_dtype)(h).reshape(b, height * width, c)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", w, v).reshape(b, height, width, c)
    h = dense(c, "proj_out", self.dtype, self.param_dtype, init_scale=0.0)(h)
    return x + h


class Downsample(nn.Module):
  """Halve H and W: [B, H, W, C] -> [B, H/2, W/2, C] (H, W even).

  With `with_conv`, a 3x3 stride-2 conv `conv` padded like TF "SAME" for even sizes: 0 before,
  1 after (bottom/right). Otherwise 2x2 average pooling with stride 2.
  """

  with_conv: bool = True
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, height, width, c = x.shape
    if height % 2 or width % 2:
      raise ValueError(f"Downsample needs even spatial sizes, got {height}x{width}")
    if self.with_conv:
      return conv3x3(
        c,
        "conv",
        self.dtype,
        self.param_dtype,
        strides=2,
        padding=((0, 1), (0, 1)),
        conv_impl=self.conv_impl,
      )(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv `conv` if `with_conv`: [B, H, W, C] -> [B, 2H, 2W, C].

  The original's resize(align_corners=True, NEAREST) at exactly 2x is a plain repeat; with the
  conv, the two run as one sub-pixel convolution of x (`convolution.upsample_conv3x3`).
  """

  with_conv: bool = True
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.with_conv:
      return convolution.upsample_nearest(x)
    return conv3x3(
      x.shape[-1], "conv", self.dtype, self.param_dtype, conv_impl=self.conv_impl, upsample=True
    )(x)
