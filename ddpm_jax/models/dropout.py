"""Dropout whose random bits XLA fuses: threefry2x32 written out as jnp operations.

On CPU, jax.random's threefry2x32 lowers to a rolled loop of five iterations, which keeps
compile times down. XLA cannot fuse across the loop, so each dropout mask takes about ten
passes over uint32 arrays the size of the activations. The same 20 rounds written out here fuse
into the mask's one element-wise pass. The bits are exactly `jax.extend.random.threefry_2x32`'s
(a test checks it); keep = bits >= rate * 2^32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def threefry_2x32(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 (20 rounds) of the counter pairs (x0, x1) under key uint32 [2]; x0, x1 and
  the results are uint32 arrays of one shape."""
  ks = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 bits of `shape` under key uint32 [2]: threefry_2x32 of the counters 0 .. n-1 (as
  jax.extend.random.threefry_2x32 of an arange)."""
  n = math.prod(shape)
  half = (n + 1) // 2
  x0 = jax.lax.iota(jnp.uint32, half)
  y0, y1 = threefry_2x32(key, x0, x0 + np.uint32(half))
  return jnp.concatenate([y0, y1])[:n].reshape(shape)


class Dropout(nn.Module):
  """Inverted dropout as nn.Dropout (keep with probability 1 - rate, scale by 1 / (1 - rate)),
  drawing its mask with `random_bits` from the 'dropout' RNG stream."""

  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    key = self.make_rng("dropout")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    if key.shape != (2,):  # Not a threefry key (e.g. rbg's four words): flax's own dropout.
      return nn.Dropout(self.rate, deterministic=False)(x)
    threshold = np.uint32(min(round(self.rate * 2.0**32), 2**32 - 1))
    keep = random_bits(key, x.shape) >= threshold
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))
