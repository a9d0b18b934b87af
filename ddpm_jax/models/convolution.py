"""Three equal ways to compute the U-Net's 3x3 convolution; `model.conv_impl` picks one.

All take x [B, H, W, C] (NHWC) and a kernel [3, 3, C, O] (HWIO), explicit padding and a stride,
and give the same result (up to float summation order). They differ only in the kernels XLA runs:
  "xla"              lax.conv_general_dilated and its autodiff transposes. The default, and the
                     form for TPU and GPU; on CPU the fastest too, with the XLA flags that
                     `ddpm_jax.runtime.xla_flags` sets (Eigen convolution thunks, not YNNPACK).
  "xla_matmul_grad"  the same forward and input gradient, but for inputs of at least 32x32 the
                     kernel gradient as nine matmuls, one per tap: dW[i, j] = shift_ij(x)^T g.
                     It helps only under XLA:CPU's default YNNPACK convolutions (without those
                     flags), where the kernel gradient is a slow convolution with an H x W
                     window.
  "shifted_matmul"   the whole convolution as one matmul over the nine shifted views of x
                     (im2col), accumulated in float32 (`preferred_element_type`): on CPUs with
                     bfloat16 matrix units (AMX) this is what reaches them.
`benchmarks/` measures them (README, "Performance"). `upsample_conv3x3` is the convolution of an
input upsampled x2 (nearest), with "xla" as one 2x2 convolution of the input (sub-pixel form).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

CONV_IMPLS = ("xla", "xla_matmul_grad", "shifted_matmul")
MATMUL_GRAD_MIN_PIXELS = 32 * 32  # Smaller inputs keep XLA's kernel gradient (faster for them).
Padding = tuple[tuple[int, int], tuple[int, int]]
_NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_NHWC)


def _shifted_views(x: jax.Array, stride: int, padding: Padding) -> list[jax.Array]:
  """The nine views x_pad[:, i::stride, j::stride] [B, H_out, W_out, C], taps in (i, j) order."""
  (top, bottom), (left, right) = padding
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  h_out = (xp.shape[1] - 3) // stride + 1
  w_out = (xp.shape[2] - 3) // stride + 1
  return [
    xp[:, i : i + stride * (h_out - 1) + 1 : stride, j : j + stride * (w_out - 1) + 1 : stride, :]
    for i in range(3)
    for j in range(3)
  ]


def _shifted_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
  cols = jnp.concatenate(_shifted_views(x, stride, padding), axis=-1)  # [B, H', W', 9 C]
  out = jnp.einsum(
    "bhwk,ko->bhwo", cols, kernel.reshape(-1, kernel.shape[-1]), preferred_element_type=jnp.float32
  )
  return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grad(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
  return _lax_conv(x, kernel, stride, padding)


def _conv_matmul_grad_fwd(x, kernel, stride, padding):
  return _lax_conv(x, kernel, stride, padding), (x, kernel)


def _conv_matmul_grad_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _lax_conv(x, kernel, stride, padding), x)
  g2 = g.reshape(-1, g.shape[-1])  # [B H' W', O]
  taps = [
    jax.lax.dot_general(
      v.reshape(-1, v.shape[-1]), g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    for v in _shifted_views(x, stride, padding)
  ]  # Nine [C, O].
  d_kernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
  return input_vjp(g)[0], d_kernel


_conv_matmul_grad.defvjp(_conv_matmul_grad_fwd, _conv_matmul_grad_bwd)


def varying_like(param: jax.Array, x: jax.Array) -> jax.Array:
  """Under shard_map, marks a replicated parameter as varying over x's mesh axes: the implicit
  broadcast autodiff would insert (its transpose sums the parameter's gradient over devices),
  which a custom VJP must see explicitly. Outside shard_map, the parameter as it is."""
  axes = tuple(
    sorted(jax.typeof(x).manual_axis_type.varying - jax.typeof(param).manual_axis_type.varying)
  )
  return jax.lax.pcast(param, axes, to="varying") if axes else param


def _fold_taps(kernel: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """The two 2-tap kernels along `axis` that a 3-tap kernel [w0, w1, w2] becomes on an input
  repeated twice along that axis: [w0, w1 + w2] for even outputs, [w0 + w1, w2] for odd ones."""
  w0, w1, w2 = jnp.split(kernel, 3, axis=axis)
  return jnp.concatenate([w0, w1 + w2], axis), jnp.concatenate([w0 + w1, w2], axis)


def upsample_nearest(x: jax.Array) -> jax.Array:
  """x [B, H, W, C] repeated twice along H and W -> [B, 2H, 2W, C] (nearest-neighbour x2)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _sub_pixel_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  batch, height, width, channels = x.shape
  out = kernel.shape[-1]
  taps = kernel.astype(jnp.float32)  # Summed in float32 whatever the compute dtype.
  phases = [jnp.stack(_fold_taps(rows, 1)) for rows in _fold_taps(taps, 0)]  # a: [b, 2, 2, C, O]
  kernel2 = jnp.transpose(jnp.stack(phases), (2, 3, 4, 0, 1, 5)).reshape(2, 2, channels, 4 * out)
  y = _lax_conv(x, kernel2.astype(kernel.dtype), 1, ((1, 1), (1, 1)))
  y = y.reshape(batch, height + 1, width + 1, 2, 2, out)
  rows = [
    jnp.stack([y[:, a : a + height, b : b + width, a, b] for b in range(2)], axis=3)
    for a in range(2)
  ]  # a: [B, H, W, 2 (b), O]
  return jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, out)


@jax.custom_vjp
def _upsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _sub_pixel_conv(x, kernel)


def _upsample_conv_fwd(x, kernel):
  return _sub_pixel_conv(x, kernel), (x, kernel)


def _upsample_conv_bwd(residuals, g):
  # The gradients of the upsample-first form: XLA:CPU runs the sub-pixel form's own (a 2x2
  # kernel gradient over 4 O outputs) several times slower. Its forward pass is dead code here.
  return jax.vjp(lambda x, kernel: conv3x3(upsample_nearest(x), kernel), *residuals)[1](g)


_upsample_conv.defvjp(_upsample_conv_fwd, _upsample_conv_bwd)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, impl: str = "xla") -> jax.Array:
  """conv3x3 (padding 1) of x [B, H, W, C] repeated twice along H and W (nearest-neighbour x2)
  -> [B, 2H, 2W, O].

  With impl "xla", in the sub-pixel form: output pixel (2i + a, 2j + b) sees input rows
  i - 1 + a, i + a and columns j - 1 + b, j + b, with the 3x3 taps that fall on each summed. So
  one 2x2 convolution of x (padding 1) [B, H + 1, W + 1, 4 O] gives all four phases (a, b), with
  16 instead of 36 multiply-adds per input pixel and channel pair; the gradients are those of
  the upsample-first form. Other impls upsample first.
  """
  if impl != "xla":
    return conv3x3(upsample_nearest(x), kernel, impl=impl)
  return _upsample_conv(x, varying_like(kernel, x))


def conv3x3(
  x: jax.Array,
  kernel: jax.Array,
  stride: int = 1,
  padding: Sequence[Sequence[int]] = ((1, 1), (1, 1)),
  impl: str = "xla",
) -> jax.Array:
  """x [B, H, W, C] * kernel [3, 3, C, O] -> [B, H', W', O] in x's dtype, by `impl`."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  pad: Padding = (tuple(padding[0]), tuple(padding[1]))  # type: ignore[assignment]
  if impl == "shifted_matmul":
    return _shifted_matmul(x, kernel, stride, pad)
  if impl == "xla_matmul_grad" and x.shape[1] * x.shape[2] >= MATMUL_GRAD_MIN_PIXELS:
    return _conv_matmul_grad(x, varying_like(kernel, x), stride, pad)
  return _lax_conv(x, kernel, stride, pad)
