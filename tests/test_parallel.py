"""The mesh helpers and the one padding helper every batched program uses."""

import jax
import numpy as np
import pytest

from ddpm_jax import parallel


def test_round_up_and_pad_rows():
  assert [parallel.round_up(n, 4) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
  x = np.arange(6).reshape(3, 2)
  padded = parallel.pad_rows(x, 5)
  np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
  np.testing.assert_array_equal(parallel.pad_rows(x, 3), x)
  for bad in (2, 0):
    with pytest.raises(ValueError, match="expected 1 to"):
      parallel.pad_rows(x[:bad] if bad == 0 else x, bad)


def test_pad_unpad_calls_one_shape_and_cuts_every_output():
  shapes = []

  def fn(a, b):
    shapes.append((a.shape, b.shape))
    return {"sum": a + b, "first": a[:, :1]}

  out = parallel.pad_unpad(fn, 8)(np.ones((3, 2)), np.full((3, 2), 2.0))
  assert shapes == [((8, 2), (8, 2))]
  np.testing.assert_array_equal(out["sum"], np.full((3, 2), 3.0))
  assert out["first"].shape == (3, 1)


def test_shard_rows_splits_over_the_mesh():
  mesh = parallel.make_mesh()
  x = np.arange(16, dtype=np.float32).reshape(8, 2)
  array = parallel.shard_rows(x, mesh)
  assert array.sharding == parallel.batch_sharding(mesh)
  assert len({shard.device for shard in array.addressable_shards}) == jax.device_count() == 4
  np.testing.assert_array_equal(np.asarray(array), x)
  assert parallel.platform(mesh) == "cpu"
