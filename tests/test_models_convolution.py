"""The three forms of the 3x3 convolution (`model.conv_impl`): same values, same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config
from jax.sharding import PartitionSpec as P

from ddpm_jax import model_bundle, parallel
from ddpm_jax.config.validation import ConfigError, validate_config
from ddpm_jax.models import UNet, convolution

IMPLS = convolution.CONV_IMPLS


def _numpy_conv(x, kernel, stride, padding):
  """Direct float64 sum over the nine taps: out[b, p, q, o] = sum x_pad[b, s p + i, s q + j, c]
  kernel[i, j, c, o]."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
  h_out = (x.shape[1] - 3) // stride + 1
  w_out = (x.shape[2] - 3) // stride + 1
  out = np.zeros((x.shape[0], h_out, w_out, kernel.shape[-1]))
  for i in range(3):
    for j in range(3):
      view = x[
        :, i : i + stride * (h_out - 1) + 1 : stride, j : j + stride * (w_out - 1) + 1 : stride
      ]
      out += view @ np.asarray(kernel[i, j], np.float64)
  return out


# 32x32 inputs take the matmul kernel gradient of "xla_matmul_grad" (8x8 ones keep XLA's).
@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("stride, padding", [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1)))])
@pytest.mark.parametrize("impl", IMPLS)
def test_values_and_gradients_agree(impl, stride, padding, size):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 4))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 5))
  out = convolution.conv3x3(x, kernel, stride, padding, impl)
  np.testing.assert_allclose(out, _numpy_conv(x, kernel, stride, padding), atol=1e-4)

  def loss(x, kernel, impl):  # A non-linear loss, so the cotangent varies over the output.
    return jnp.sum(jnp.sin(convolution.conv3x3(x, kernel, stride, padding, impl)))

  grads = jax.grad(loss, (0, 1))(x, kernel, impl)
  reference = jax.grad(loss, (0, 1))(x, kernel, "xla")
  for g, r in zip(grads, reference, strict=True):
    assert float(jnp.max(jnp.abs(r))) > 1.0
    np.testing.assert_allclose(g, r, atol=5e-4, rtol=1e-4)


def _upsampled(x):
  return np.repeat(np.repeat(np.asarray(x, np.float64), 2, axis=1), 2, axis=2)


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (1, 5, 3, 6), (3, 1, 1, 2)])
@pytest.mark.parametrize("impl", IMPLS)
def test_upsample_conv_is_the_convolution_of_the_upsampled_input(impl, shape):
  """The sub-pixel form ("xla") and the upsample-first forms equal the direct float64 sum, in
  value and gradient; "xla" runs one 2x2 convolution with four outputs per channel."""
  x = jax.random.normal(jax.random.PRNGKey(2), shape)
  kernel = jax.random.normal(jax.random.PRNGKey(3), (3, 3, shape[-1], 5))
  same = ((1, 1), (1, 1))
  out = convolution.upsample_conv3x3(x, kernel, impl)
  assert out.shape == (shape[0], 2 * shape[1], 2 * shape[2], 5)
  np.testing.assert_allclose(out, _numpy_conv(_upsampled(x), kernel, 1, same), atol=1e-4)

  def loss(x, kernel, upsampled_first):
    if upsampled_first:
      y = convolution.conv3x3(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), kernel)
    else:
      y = convolution.upsample_conv3x3(x, kernel, impl)
    return jnp.sum(jnp.sin(y))

  grads = jax.grad(loss, (0, 1))(x, kernel, False)
  reference = jax.grad(loss, (0, 1))(x, kernel, True)
  for g, r in zip(grads, reference, strict=True):
    assert float(jnp.max(jnp.abs(r))) > 1.0
    np.testing.assert_allclose(g, r, atol=5e-4, rtol=1e-4)
  hlo = jax.jit(convolution.upsample_conv3x3, static_argnums=2).lower(x, kernel, impl).as_text()
  convolutions = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
  if impl == "xla":
    assert len(convolutions) == 1 and f"tensor<2x2x{shape[-1]}x20xf32>" in convolutions[0]


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match=r"conv_impl must be one of .*'fft'"):
    convolution.conv3x3(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), impl="fft")


def test_matmul_kernel_gradient_is_summed_over_devices_once():
  """Under shard_map (4 devices) the custom kernel gradient is the gradient of the global loss:
  summed over the devices exactly once, as autodiff of lax.conv does."""
  mesh = parallel.make_mesh()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 2))

  def local_loss(kernel, x, impl):
    return jnp.sum(jnp.cos(convolution.conv3x3(x, kernel, impl=impl)))

  grads = {}
  for impl in ("xla", "xla_matmul_grad"):
    # check_vma sums the replicated kernel's gradient over the devices.
    fn = jax.jit(
      jax.shard_map(
        lambda k, x, impl=impl: jax.grad(local_loss)(k, x, impl),
        mesh=mesh,
        in_specs=(P(), P(parallel.AXIS)),
        out_specs=P(),
      )
    )
    grads[impl] = fn(kernel, x)
  single = jax.grad(local_loss)(kernel, x, "xla")
  np.testing.assert_allclose(grads["xla"], single, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(grads["xla_matmul_grad"], single, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("impl", ["xla_matmul_grad", "shifted_matmul"])
def test_unet_outputs_and_gradients_do_not_depend_on_the_impl(impl):
  config = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
  t = jnp.array([3, 700])
  model = UNet(**config)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x, t)["params"]
  params = jax.tree.map(
    lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params
  )
  other = UNet(**config, conv_impl=impl)
  assert jax.tree.structure(
    jax.eval_shape(other.init, jax.random.PRNGKey(1), x, t)
  ) == jax.tree.structure({"params": params})

  def loss(params, m):
    return jnp.mean(m.apply({"params": params}, x, t) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (value, grads), (other_value, other_grads) = (
    value_and_grad(params, model),
    value_and_grad(params, other),
  )
  assert float(value) > 1e-3
  np.testing.assert_allclose(other_value, value, rtol=1e-4)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), other_grads, grads
  )


def test_the_config_field_reaches_the_model_and_is_validated():
  config = tiny_digits_config(**{"model.conv_impl": "shifted_matmul"})
  assert model_bundle.create_model(config).conv_impl == "shifted_matmul"
  with pytest.raises(ConfigError, match=r"model.conv_impl='im2col'.*xla, xla_matmul_grad"):
    validate_config(tiny_digits_config(**{"model.conv_impl": "im2col"}), device_count=4)
