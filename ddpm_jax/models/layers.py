"""Building blocks of the DDPM U-Net (Ho et al. 2020, Appendix B), mirroring diffusion_tf/nn.py.

Every layer takes the compute `dtype` and the storage `param_dtype`; GroupNorm statistics and the
attention softmax always run in float32. Module and parameter names follow the original TF scopes
(see `ddpm_jax.models.unet` for the full mapping).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import convolution

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
  return jax.nn.initializers.variance_scaling(
    1e-10 if scale == 0 else scale, "fan_avg", "uniform")


class GroupNorm(nn.Module):
  """GroupNorm over [B, ..., C] in float32 with params `scale` and `bias` [C], as nn.GroupNorm.

  The same maths as tf.contrib.layers.group_norm (two-pass variance over each group's spatial
  positions and channels), written as per-channel spatial means followed by means over each
  group's channels: XLA:CPU runs these 1.5-2.5x faster than reductions over nn.GroupNorm's
  [B, H, W, G, C/G] view (whose minor axis may hold a single channel).
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, channels = x.shape[0], x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
    per_group = channels // self.num_groups
    scale = self.param("scale", jax.nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param("bias", jax.nn.initializers.zeros, (channels,), self.param_dtype)
    spatial = tuple(range(1, x.ndim - 1))

    def group_mean(v):  # [B, ..., C] -> each group's mean, broadcast back to [B, 1.., C].
      per_channel = jnp.mean(v, axis=spatial).reshape(batch, self.num_groups, per_group)
      means = jnp.repeat(jnp.mean(per_channel, axis=-1), per_group, axis=-1)
      return means.reshape(batch, *(1,) * len(spatial), channels)

    x = x.astype(jnp.float32)
    centred = x - group_mean(x)
    normed = centred * jax.lax.rsqrt(group_mean(centred * centred) + self.epsilon)
    return normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def group_norm(name: str, param_dtype: Dtype, parent: Any = None) -> GroupNorm:
  """GroupNorm(32 groups, eps 1e-6) computed in float32 (tf.contrib.layers.group_norm)."""
  kw = {} if parent is None else {"parent": parent}
  return GroupNorm(32, 1e-6, param_dtype, name=name, **kw)


class Conv3x3(nn.Module):
  """3x3 convolution [B, H, W, C] -> [B, H', W', features]: kernel [3, 3, C, features] (HWIO)
  and a zero-initialised bias, like nn.Conv, computed by `convolution.conv3x3(impl=...)`."""

  features: int
  strides: int = 1
  padding: Any = ((1, 1), (1, 1))  # "SAME" for stride 1.
  init_scale: float = 1.0
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", default_init(self.init_scale),
                        (3, 3, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", jax.nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = convolution.conv3x3(x, kernel, self.strides, self.padding, self.conv_impl)
    return y + bias


def conv3x3(
  features: int, name: str, dtype: Dtype, param_dtype: Dtype, init_scale: float = 1.0,
  strides: int = 1, padding: Any = ((1, 1), (1, 1)), conv_impl: str = "xla", parent: Any = None,
) -> Conv3x3:
  """The 3x3 convolution `name` (a child of `parent` if given); see `Conv3x3`."""
  kw = {} if parent is None else {"parent": parent}
  return Conv3x3(features, strides, padding, init_scale, conv_impl, dtype, param_dtype, name=name,
                 **kw)


def dense(
  features: int, name: str, dtype: Dtype, param_dtype: Dtype, init_scale: float = 1.0
) -> nn.Dense:
  """Dense over the last axis, kernel [in, out]; also the original's 1x1 `nin` layers."""
  return nn.Dense(
    features, dtype=dtype, param_dtype=param_dtype, kernel_init=default_init(init_scale),
    bias_init=jax.nn.initializers.zeros, name=name)


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
    h = swish(group_norm("norm1", self.param_dtype)(x))
    h = conv3x3(out_ch, "conv1", self.dtype, self.param_dtype, conv_impl=self.conv_impl)(h)
    h = h + dense(out_ch, "temb_proj", self.dtype, self.param_dtype)(swish(temb))[:, None, None, :]
    h = swish(group_norm("norm2", self.param_dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv3x3(out_ch, "conv2", self.dtype, self.param_dtype, init_scale=0.0,
                conv_impl=self.conv_impl)(h)
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
        c, "conv", self.dtype, self.param_dtype, strides=2, padding=((0, 1), (0, 1)),
        conv_impl=self.conv_impl)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv `conv` if `with_conv`: [B, H, W, C] -> [B, 2H, 2W, C].

  The original's resize(align_corners=True, NEAREST) at exactly 2x is a plain repeat.
  """

  with_conv: bool = True
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = conv3x3(x.shape[-1], "conv", self.dtype, self.param_dtype, conv_impl=self.conv_impl)(x)
    return x
