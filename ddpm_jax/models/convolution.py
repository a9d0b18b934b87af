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
`benchmarks/` measures them (README, "Performance").
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
