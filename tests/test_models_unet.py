"""Tests of the DDPM U-Net: exact architecture (counts, names), layers against closed forms."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax._src.ad_checkpoint import saved_residuals  # No public API returns them.

from ddpm_jax.models import UNet, get_timestep_embedding, layers
from ddpm_jax.models.layers import AttnBlock, Dense, Downsample, GroupNorm

LSUN_MULT = (1, 1, 2, 2, 4, 4)
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def _abstract_init(model: UNet, size: int, batch: int = 1):
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t), x, t


def _num_params(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _inputs(batch: int = 2, size: int = 16, seed: int = 1):
  kx, kt = jax.random.split(jax.random.key(seed))
  x = jax.random.uniform(kx, (batch, size, size, 3), minval=-1.0, maxval=1.0)
  t = jax.random.randint(kt, (batch,), 0, 1000, dtype=jnp.int32)
  return x, t


def _perturb(params, seed: int = 2, std: float = 0.05):
  """Replace every parameter (arrays or shapes) by N(0, std^2) so no layer starts near zero.

  numpy draws: compiling one jax.random call per parameter shape is slow on small CPUs.
  """
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda leaf: jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype), params
  )


@pytest.fixture(scope="module")
def tiny():
  """A tiny U-Net (16x16, levels 16 and 8, attention at 8): random params of the right shapes."""
  model = UNet(**TINY)
  x, t = _inputs()
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  return model, _perturb(shapes), x, t


# 1. shapes
def test_output_shape_tiny_32():
  model = UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,))
  x, t = _inputs(batch=2, size=32)
  variables = {"params": _perturb(jax.eval_shape(model.init, jax.random.key(0), x, t)["params"])}
  out = jax.jit(model.apply)(variables, x, t)
  assert float(jnp.std(out)) > 1e-2
  assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32


def test_output_shape_256_abstract():
  model = UNet(ch_mult=LSUN_MULT)
  variables, x, t = _abstract_init(model, 256, batch=2)
  assert _num_params(variables["params"]) == 113_673_219
  out = jax.eval_shape(model.apply, variables, x, t)
  assert out.shape == (2, 256, 256, 3) and out.dtype == jnp.float32


# 2. exact parameter counts and names
@pytest.mark.parametrize(
  "kwargs,size,expected",
  [
    (dict(), 32, 35_746_307),
    (dict(out_ch=6), 32, 35_749_766),
    (dict(ch_mult=LSUN_MULT), 256, 113_673_219),
    (dict(ch=192, ch_mult=LSUN_MULT), 256, 255_677_955),
  ],
)
def test_parameter_counts(kwargs, size, expected):
  variables, _, _ = _abstract_init(UNet(**kwargs), size)
  assert set(variables) == {"params"}
  assert _num_params(variables["params"]) == expected


def test_cifar10_parameter_names():
  variables, _, _ = _abstract_init(UNet(), 32)
  flat = traverse_util.flatten_dict(variables["params"])
  assert len(flat) == 328  # the original checkpoint's 328 non-EMA variables under model/
  expected = {
    ("temb", "dense0", "kernel"): (128, 512),
    ("temb", "dense1", "kernel"): (512, 512),
    ("conv_in", "kernel"): (3, 3, 3, 128),
    ("down_0", "block_0", "conv1", "kernel"): (3, 3, 128, 128),
    ("down_0", "block_0", "norm1", "scale"): (128,),
    ("down_0", "block_0", "temb_proj", "kernel"): (512, 128),
    ("down_0", "downsample", "conv", "kernel"): (3, 3, 128, 128),
    ("down_1", "block_0", "nin_shortcut", "kernel"): (128, 256),
    ("down_1", "attn_1", "proj_out", "kernel"): (256, 256),
    ("mid", "attn_1", "q", "kernel"): (256, 256),
    ("mid", "block_2", "conv2", "bias"): (256,),
    ("up_0", "block_2", "nin_shortcut", "kernel"): (256, 128),
    ("up_1", "attn_2", "norm", "bias"): (256,),
    ("up_3", "block_0", "conv1", "kernel"): (3, 3, 512, 256),
    ("up_3", "upsample", "conv", "kernel"): (3, 3, 256, 256),
    ("norm_out", "scale"): (128,),
    ("conv_out", "kernel"): (3, 3, 128, 3),
  }
  for path, shape in expected.items():
    assert flat[path].shape == shape, path
  # No extra scope levels, attention only at 16x16 (level 1), no downsample at the last level.
  assert {k[0] for k in flat} == {
    "temb",
    "conv_in",
    "mid",
    "norm_out",
    "conv_out",
    *(f"down_{i}" for i in range(4)),
    *(f"up_{i}" for i in range(4)),
  }
  assert {k[1] for k in flat if k[0] == "down_1"} == {
    "block_0",
    "block_1",
    "attn_0",
    "attn_1",
    "downsample",
  }
  assert not any(k[:2] == ("down_3", "downsample") for k in flat)
  assert not any(k[:2] == ("up_0", "upsample") for k in flat)
  assert not any(k[1].startswith("attn") for k in flat if k[0] in ("down_0", "up_2"))


# 3. timestep embedding
def test_timestep_embedding_matches_formula():
  t = np.array([0, 1, 17, 500, 999])
  dim = 128
  half = dim // 2
  freqs = np.exp(-np.arange(half, dtype=np.float64) * math.log(10000) / (half - 1))
  args = t[:, None].astype(np.float64) * freqs[None]
  expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  got = np.asarray(get_timestep_embedding(jnp.asarray(t, jnp.int32), dim))
  assert got.shape == (5, dim) and got.dtype == np.float32
  # float32 like the original: the rounding of the argument t * freq (ulp(999) = 6e-5 in float32)
  # bounds the error, so the tolerance grows with t (1e-5 up to t = 74, 1.2e-4 at t = 999).
  atol = 1e-6 + 1.2e-7 * t[:, None]
  assert np.all(np.abs(got - expected) <= atol), np.max(np.abs(got - expected), axis=1)
  # sin first: t=0 gives [0, ..., 0, 1, ..., 1].
  np.testing.assert_array_equal(got[0], np.r_[np.zeros(half), np.ones(half)])
  odd = get_timestep_embedding(jnp.asarray(t, jnp.int32), 9)
  assert odd.shape == (5, 9) and np.all(np.asarray(odd[:, -1]) == 0)


# 4. stride-2 downsample padding
def test_downsample_matches_tf_same_padding():
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
  module = Downsample(with_conv=True)
  variables = module.init(jax.random.key(4), x)
  kernel = variables["params"]["conv"]["kernel"]
  bias = jax.random.normal(jax.random.key(5), (4,))
  variables = {"params": {"conv": {"kernel": kernel, "bias": bias}}}
  out = module.apply(variables, x)
  assert out.shape == (2, 4, 4, 4)

  def conv(xp):
    return (
      jax.lax.conv_general_dilated(
        xp, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      + bias
    )

  tf_same = conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))
  symmetric = conv(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))[:, :4, :4]
  np.testing.assert_allclose(out, tf_same, atol=1e-5)
  assert np.max(np.abs(out - symmetric)) > 1e-2

  pooled = Downsample(with_conv=False).apply({}, x)
  np.testing.assert_allclose(pooled, x.reshape(2, 4, 2, 4, 2, 4).mean(axis=(2, 4)), atol=1e-6)


# 5. near-zero output at init
def test_output_near_zero_at_init(tiny):
  model, _, x, t = tiny
  # An rbg key compiles much faster than threefry on CPU; the initialisers' laws are the same.
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, t)["params"]
  out, state = model.apply(
    {"params": params}, x, t, capture_intermediates=lambda mdl, _: mdl.name == "norm_out"
  )
  # conv_out has variance scale 1e-10: outputs are ~1e-5 of what a scale-1 init would give.
  assert float(jnp.max(jnp.abs(out))) < 1e-4
  normed = state["intermediates"]["norm_out"]["__call__"][0]
  assert 0.5 < float(jnp.std(normed)) < 2.0  # activations entering conv_out are O(1)
  kernel = params["conv_out"]["kernel"]
  rescaled = {**params, "conv_out": {**params["conv_out"], "kernel": kernel * 1e5}}
  big = model.apply({"params": rescaled}, x, t)
  assert 0.05 < float(jnp.std(big)) < 10.0
  # All biases (GroupNorm's too) start at zero.
  flat = traverse_util.flatten_dict(params)
  assert all(float(jnp.max(jnp.abs(v))) == 0.0 for k, v in flat.items() if k[-1] == "bias")


# 6. dropout only when training
def test_dropout_only_in_train(tiny):
  _, params, x, t = tiny
  model = UNet(**TINY, dropout=0.5)
  variables = {"params": params}
  eval_a = model.apply(variables, x, t, train=False)
  eval_b = model.apply(variables, x, t, train=False, rngs={"dropout": jax.random.key(7)})
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = model.apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(7)})
  train_a2 = model.apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(7)})
  train_b = model.apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(8)})
  np.testing.assert_array_equal(train_a, train_a2)
  assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-3
  assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-3


# 7. rematerialisation
def test_remat_same_params_and_outputs_less_saved_memory():
  # Two levels at 8x8: blocks with and without nin_shortcut, attention, dropout, resampling and
  # the output head, all rematerialised.
  config = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.3)
  model, remat_model = UNet(**config), UNet(**config, remat=True)
  x, t = _inputs(size=8)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  remat_shapes = jax.eval_shape(remat_model.init, jax.random.key(0), x, t)["params"]
  assert jax.tree_util.tree_structure(remat_shapes) == jax.tree_util.tree_structure(shapes)
  assert jax.tree_util.tree_all(
    jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, remat_shapes, shapes)
  )
  params = _perturb(shapes)
  ref = model.apply({"params": params}, x, t, train=False)
  np.testing.assert_allclose(remat_model.apply({"params": params}, x, t), ref, atol=1e-5)

  def loss(p, m):
    out = m.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(9, impl="rbg")})
    return jnp.sum(out**2)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  value, grads = value_and_grad(params, model)
  remat_value, remat_grads = value_and_grad(params, remat_model)
  np.testing.assert_allclose(remat_value, value, rtol=1e-5)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), remat_grads, grads
  )

  # What the forward pass keeps for the backward pass: with remat only the inputs of the
  # rematerialised parts (a block's input, not its intermediates: 40% of them at this size).
  def saved_bytes(m):
    residuals = saved_residuals(lambda p: loss(p, m), params)
    return sum(a.size * a.dtype.itemsize for a, why in residuals if "argument" not in why)

  assert saved_bytes(remat_model) < 0.5 * saved_bytes(model)


# 8. bfloat16 compute
def test_bfloat16_compute(tiny):
  _, params, x, t = tiny
  variables = {"params": params}
  bf16_model = UNet(**TINY, dtype=jnp.bfloat16)
  assert all(
    leaf.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves(
      jax.eval_shape(bf16_model.init, jax.random.key(0), x, t)["params"]
    )
  )
  ref = UNet(**TINY).apply(variables, x, t)
  out = bf16_model.apply(variables, x, t)
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0 < rel < 5e-2


# 9. attention block
def _np_group_norm(x, scale, bias, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = xg.var(axis=(1, 2, 4), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


# 1, 3 and 4 channels per group; 4x4 maps reduce, 16x16 ones are matrix-vector products on CPU.
@pytest.mark.parametrize("channels,size", [(32, 4), (96, 4), (128, 4), (64, 16)])
def test_group_norm_matches_numpy(channels, size):
  x = (
    np.asarray(jax.random.normal(jax.random.key(3), (2, size, size, channels)), np.float64) * 3 + 1
  )
  scale = 1 + 0.1 * np.arange(channels)
  bias = np.linspace(-1, 1, channels)
  params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  module = GroupNorm()
  assert jax.tree.map(jnp.shape, module.init(jax.random.key(0), x)["params"]) == {
    "scale": (channels,),
    "bias": (channels,),
  }
  out = module.apply({"params": params}, jnp.asarray(x, jnp.bfloat16))  # Computed in float32.
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(
    module.apply({"params": params}, jnp.asarray(x, jnp.float32)),
    _np_group_norm(x, scale, bias),
    atol=2e-5,
    rtol=1e-5,
  )


@pytest.mark.parametrize("channels,size", [(32, 4), (96, 4), (64, 16)])
def test_group_norm_gradient_equals_autodiff_of_flax_group_norm(channels, size):
  """The closed-form backward pass equals autodiff through nn.GroupNorm's formulation."""
  x = jax.random.normal(jax.random.key(4), (2, size, size, channels)) * 2 + 0.5
  params = {
    "scale": 1 + 0.2 * jax.random.normal(jax.random.key(5), (channels,)),
    "bias": 0.3 * jax.random.normal(jax.random.key(6), (channels,)),
  }
  reference = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False)
  weights = jax.random.normal(jax.random.key(7), x.shape)  # A cotangent that varies everywhere.

  def loss(params, x, module):
    return jnp.sum(jnp.sin(module.apply({"params": params}, x)) * weights)

  ours = jax.grad(loss, (0, 1))(params, x, GroupNorm())
  theirs = jax.grad(loss, (0, 1))(params, x, reference)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), ours, theirs)
  assert float(jnp.max(jnp.abs(ours[1]))) > 0.1


def _ops(fn, x):
  """The HLO opcodes of fn(x) as XLA compiles it for this backend."""
  text = jax.jit(fn).lower(x).compile().as_text()
  return {op for op in ("dot", "reduce") for line in text.splitlines() if f" {op}(" in line}


@pytest.mark.parametrize(
  "shape,by",
  [
    ((2, 16, 16, 64), "matvec"),  # 256 positions: the smallest map that is a matrix-vector product.
    ((16, 32, 32, 8), "matvec"),  # batch x positions = MATVEC_MEAN_MAX_ELEMENTS.
    ((2, 8, 8, 64), "reduction"),  # Too few positions.
    ((32, 32, 32, 8), "reduction"),  # Too many elements.
    ((3, 16, 16, 16, 8), "matvec"),  # Any number of spatial axes.
  ],
)
def test_spatial_mean_is_the_mean_and_a_matvec_on_cpu_for_mid_sized_maps(shape, by):
  x = jax.random.normal(jax.random.key(9), shape) * 2 + 1
  expected = np.asarray(x, np.float64).mean(axis=tuple(range(1, x.ndim - 1)))
  np.testing.assert_allclose(layers.spatial_mean(x), expected, rtol=1e-5, atol=1e-6)
  ops = _ops(layers.spatial_mean, x)
  assert ops == ({"dot"} if by == "matvec" else {"reduce"}), ops


def test_spatial_mean_reduces_on_other_platforms():
  """platform_dependent keeps the reduction for GPU and TPU (lowered without compiling)."""
  x = jnp.ones((2, 16, 16, 64))
  for platform in ("cuda", "tpu"):
    text = jax.jit(layers.spatial_mean).trace(x).lower(lowering_platforms=(platform,)).as_text()
    assert "stablehlo.reduce" in text and "dot_general" not in text, platform
  cpu = jax.jit(layers.spatial_mean).trace(x).lower(lowering_platforms=("cpu",)).as_text()
  assert "dot_general" in cpu


def test_group_norm_swish_equals_swish_of_group_norm_and_keeps_only_x_and_statistics():
  """GroupNorm(with_swish=True) is swish(GroupNorm) in value and gradient; its backward pass
  keeps x and the [B, 1, 1, C] statistics, not the normalised activations swish would keep."""
  x = jax.random.normal(jax.random.key(8), (2, 4, 4, 64)) * 2 + 0.5
  params = {
    "scale": 1 + 0.5 * jax.random.normal(jax.random.key(9), (64,)),
    "bias": jax.random.normal(jax.random.key(10), (64,)),
  }
  fused = GroupNorm(with_swish=True)
  weights = jax.random.normal(jax.random.key(11), x.shape)

  def reference(variables, x):
    return jax.nn.swish(GroupNorm().apply(variables, x))

  def loss(params, x, apply):
    return jnp.sum(jnp.sin(apply({"params": params}, x)) * weights)

  np.testing.assert_allclose(
    fused.apply({"params": params}, x), reference({"params": params}, x), atol=1e-6
  )
  ours = jax.grad(loss, (0, 1))(params, x, fused.apply)
  theirs = jax.grad(loss, (0, 1))(params, x, reference)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), ours, theirs)
  assert float(jnp.max(jnp.abs(ours[0]["bias"]))) > 0.1
  saved = saved_residuals(lambda p, x: fused.apply({"params": p}, x), params, x)
  assert sorted(aval.shape for aval, _ in saved if aval.size > 64) == [
    (2, 1, 1, 64),
    (2, 1, 1, 64),
    (2, 4, 4, 64),
  ]
  saved_by_reference = saved_residuals(lambda p, x: reference({"params": p}, x), params, x)
  assert sum(aval.size for aval, _ in saved_by_reference) > sum(aval.size for aval, _ in saved)


@pytest.mark.parametrize("shape", [(3, 8), (2, 4, 4, 8)])
def test_dense_equals_flax_dense_and_its_gradient_dots_are_2d(shape):
  """Dense has nn.Dense's parameters, outputs and gradients; its dots contract one axis of 2-D
  operands (nn.Dense's kernel gradient contracts B, H, W at once, which XLA:CPU lays out as a
  transposed copy of the activations)."""
  x = jax.random.normal(jax.random.key(12), shape)
  ours, reference = Dense(5, init_scale=1.0), nn.Dense(5)
  params = _perturb(ours.init(jax.random.key(13), x)["params"], std=0.2)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
    jnp.shape, reference.init(jax.random.key(13), x)["params"]
  )
  weights = jax.random.normal(jax.random.key(14), (*shape[:-1], 5))

  def loss(params, x, module):
    return jnp.sum(jnp.sin(module.apply({"params": params}, x)) * weights)

  np.testing.assert_allclose(
    ours.apply({"params": params}, x), reference.apply({"params": params}, x), atol=1e-6
  )
  grads = jax.grad(loss, (0, 1))(params, x, ours)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
    grads,
    jax.grad(loss, (0, 1))(params, x, reference),
  )
  jaxpr = jax.make_jaxpr(lambda p, x: jax.grad(loss, (0, 1))(p, x, ours))(params, x)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3  # Forward, input gradient, kernel gradient.
  for e in dots:
    (lhs_contract, rhs_contract), _ = e.params["dimension_numbers"]
    assert [v.aval.ndim for v in e.invars] == [2, 2] and len(lhs_contract) == len(rhs_contract) == 1
  # The backward pass keeps x itself (as nn.Dense does), not a flattened copy of it.
  saved = saved_residuals(lambda p, x: ours.apply({"params": p}, x), params, x)
  assert sorted((aval.shape, why) for aval, why in saved) == sorted(
    [(shape, "from the argument x"), ((8, 5), "from the argument p['kernel']")]
  )


def test_attention_block_matches_numpy():
  x = np.asarray(jax.random.normal(jax.random.key(10), (2, 4, 4, 64)), np.float64) * 2 + 0.5
  module = AttnBlock()
  params = _perturb(module.init(jax.random.key(11), jnp.asarray(x, jnp.float32))["params"], std=0.2)
  out = np.asarray(module.apply({"params": params}, jnp.asarray(x, jnp.float32)))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)

  def nin(h, name):
    return h @ p[name]["kernel"] + p[name]["bias"]

  b, hh, ww, c = x.shape
  h = _np_group_norm(x, p["norm"]["scale"], p["norm"]["bias"]).reshape(b, hh * ww, c)
  q, k, v = nin(h, "q"), nin(h, "k"), nin(h, "v")
  logits = np.einsum("bic,bjc->bij", q, k) / np.sqrt(c)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expected = x + nin(w @ v, "proj_out").reshape(b, hh, ww, c)
  assert np.max(np.abs(expected - x)) > 0.1  # the attention path contributes
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


# 8. class conditioning
def test_the_null_class_is_the_unconditional_model_and_labels_change_the_output():
  """A conditional UNet with labels: num_classes learned embeddings added to the timestep
  embedding; the null class (y = num_classes) adds nothing, as y = None does."""
  model = UNet(**TINY, num_classes=3)
  x, t = _inputs()
  y = jnp.array([0, 2], jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y=y))["params"]
  assert shapes["class_embed"]["embedding"].shape == (3, 4 * TINY["ch"])
  params = {"params": _perturb(shapes)}
  unconditional = model.apply(params, x, t)
  null = model.apply(params, x, t, y=jnp.full((2,), 3, jnp.int32))
  np.testing.assert_array_equal(np.asarray(null), np.asarray(unconditional))
  labelled = model.apply(params, x, t, y=y)
  assert float(jnp.max(jnp.abs(labelled - unconditional))) > 1e-3
  other = model.apply(params, x, t, y=jnp.array([1, 2], jnp.int32))
  np.testing.assert_array_equal(np.asarray(other[1]), np.asarray(labelled[1]))  # Per example.
  assert float(jnp.max(jnp.abs(other[0] - labelled[0]))) > 1e-3
  # num_classes = 0 keeps every paper model exactly: no class parameters, labels refused.
  plain = jax.eval_shape(UNet(**TINY).init, jax.random.key(0), x, t)["params"]
  assert set(shapes) - set(plain) == {"class_embed"}
  with pytest.raises(ValueError, match="need a class-conditional UNet"):
    UNet(**TINY).apply({"params": _perturb(plain)}, x, t, y=y)
