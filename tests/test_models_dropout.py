"""Dropout with threefry2x32 written out (ddpm_jax.models.dropout)."""

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import dropout


@pytest.mark.parametrize("n", [1, 10, 11, 4097])
def test_bits_are_jax_threefry_of_the_counters(n):
  key = jax.random.PRNGKey(42)
  even = n + n % 2
  expected = np.asarray(jex.random.threefry_2x32(key, jnp.arange(even, dtype=jnp.uint32)))[:n]
  np.testing.assert_array_equal(np.asarray(dropout.random_bits(key, (n,))), expected)
  assert dropout.random_bits(key, (3, n)).shape == (3, n)


def test_bits_fuse_without_a_loop_on_cpu():
  """jax.random's CPU lowering is a rolled loop XLA cannot fuse across; ours has none."""

  def hlo(f):
    return jax.jit(f).lower(jax.random.PRNGKey(0)).compile().as_text()

  assert " while(" in hlo(lambda k: jax.random.bits(k, (16, 8, 8, 32)))
  assert " while(" not in hlo(lambda k: dropout.random_bits(k, (16, 8, 8, 32)))


def _apply(rate, key, x, deterministic=False):
  return dropout.Dropout(rate, deterministic).apply({}, x, rngs={"dropout": key})


def test_drops_at_the_rate_and_rescales_the_rest():
  x = jnp.full((64, 16, 16, 32), 2.0)
  y = np.asarray(_apply(0.1, jax.random.PRNGKey(3), x))
  dropped = (y == 0).mean()
  sigma = np.sqrt(0.1 * 0.9 / y.size)
  assert abs(dropped - 0.1) < 5 * sigma
  np.testing.assert_allclose(y[y != 0], 2.0 / 0.9, rtol=1e-6)


def test_masks_follow_the_key():
  x = jnp.ones((8, 8, 8, 16))
  a, a2 = _apply(0.5, jax.random.PRNGKey(1), x), _apply(0.5, jax.random.PRNGKey(1), x)
  b = _apply(0.5, jax.random.PRNGKey(2), x)
  np.testing.assert_array_equal(a, a2)
  assert (np.asarray(a) != np.asarray(b)).mean() > 0.3
  # A typed threefry key draws the same mask as its raw words.
  np.testing.assert_array_equal(_apply(0.5, jax.random.key(1), x), a)


def test_identity_when_deterministic_or_rate_zero_and_zero_at_rate_one():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 8))
  key = jax.random.PRNGKey(5)
  np.testing.assert_array_equal(_apply(0.3, key, x, deterministic=True), x)
  np.testing.assert_array_equal(_apply(0.0, key, x), x)
  np.testing.assert_array_equal(_apply(1.0, key, x), jnp.zeros_like(x))


def test_other_prng_implementations_use_flax_dropout():
  x = jnp.ones((32, 8, 8, 16))
  y = np.asarray(_apply(0.2, jax.random.key(9, impl="rbg"), x))
  assert abs((y == 0).mean() - 0.2) < 0.02
  np.testing.assert_allclose(y[y != 0], 1 / 0.8, rtol=1e-6)
