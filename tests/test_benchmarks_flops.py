"""`benchmarks.flops`: convolution and dot FLOPs counted from the jaxpr."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import flops


def _conv(x, w, groups=1):
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", feature_group_count=groups, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def test_conv_and_dot_counts():
  x, w = jnp.ones((4, 16, 16, 8)), jnp.ones((3, 3, 8, 12))
  # Every output element [4, 16, 16, 12] is a 3 x 3 x 8 dot product.
  assert flops.model_flops(_conv, x, w) == 2 * (4 * 16 * 16 * 12) * (3 * 3 * 8)
  grouped = flops.model_flops(lambda x, w: _conv(x, w, groups=2), x, jnp.ones((3, 3, 4, 12)))
  assert grouped == 2 * (4 * 16 * 16 * 12) * (3 * 3 * 4)
  assert flops.model_flops(jnp.matmul, jnp.ones((5, 7)), jnp.ones((7, 3))) == 2 * 5 * 7 * 3
  batched = flops.model_flops(
    lambda a, b: jnp.einsum("bij,bjk->bik", a, b), jnp.ones((2, 5, 7)), jnp.ones((2, 7, 3))
  )
  assert batched == 2 * 2 * 5 * 7 * 3
  assert flops.model_flops(lambda a: jnp.tanh(a) + a, jnp.ones((100, 100))) == 0


def test_gradients_scan_remat_and_xla_agreement():
  x, w = jnp.ones((4, 16, 16, 8)), jnp.ones((3, 3, 8, 12))
  forward = flops.model_flops(_conv, x, w)
  loss = lambda x, w: jnp.sum(_conv(x, w) ** 2)
  # Forward, input gradient and kernel gradient: three convolutions of the same size.
  grads = flops.model_flops(jax.grad(loss, argnums=(0, 1)), x, w)
  assert grads == 3 * forward
  assert flops.model_flops(jax.grad(jax.checkpoint(loss), argnums=(0, 1)), x, w) >= grads

  def scanned(x, w):
    return jax.lax.scan(lambda h, _: (_conv(h, w[..., :8]), None), x, length=5)[0]

  assert flops.model_flops(scanned, x, w) == 5 * 2 * (4 * 16 * 16 * 8) * (3 * 3 * 8)
  # XLA:CPU's count skips the taps that fall on SAME padding (15/16 of them are inside here
  # per axis) and adds element-wise ops; the jaxpr count includes the padding taps.
  xla = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().cost_analysis()
  xla = (xla[0] if isinstance(xla, list) else xla)["flops"]
  assert grads * (46 / 48) ** 2 == pytest.approx(xla, rel=0.02)


def test_dead_equations_are_not_counted():
  """A custom VJP whose backward pass re-runs the primal and drops it (as `jax.vjp` inside a bwd
  does) costs what XLA runs: the dropped product is dead code."""

  @jax.custom_vjp
  def matmul(x, w):
    return x @ w

  def fwd(x, w):
    return x @ w, (x, w)

  def bwd(res, g):
    x, w = res
    _, vjp = jax.vjp(lambda x: x @ w, x)  # Recomputes x @ w, then drops it.
    return vjp(g)[0], x.T @ g

  matmul.defvjp(fwd, bwd)
  x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
  one = 2 * 8 * 16 * 4
  assert flops.model_flops(matmul, x, w) == one
  # d/dw of sum(x @ w): the forward product feeds only the dropped loss value, and d/dx is
  # computed by bwd but never used: one product remains.
  assert flops.model_flops(jax.grad(lambda x, w: jnp.sum(matmul(x, w)), argnums=1), x, w) == one
  assert flops.model_flops(jax.grad(lambda x, w: jnp.sum((x @ w) ** 2), argnums=1), x, w) == 2 * one
