"""Importing the official weights: TF1 checkpoints and diffusers' UNet2DModel, names and outputs."""

import importlib
import math
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import tensorflow as tf
import torch_writer
from conftest import tiny_digits_config
from flax import traverse_util

from configs import cifar10
from ddpm_jax import convert, model_bundle
from ddpm_jax.checkpoints import checkpointer
from ddpm_jax.models import get_timestep_embedding
from ddpm_jax.training import loop as train_loop
from ddpm_jax.weights import diffusers as diffusers_weights
from ddpm_jax.weights import files, matching, tf1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF1 = tf.compat.v1


def tiny_config(**model):
  """A 16x16x3 U-Net: ch 32, ch_mult (1, 2), one ResBlock per level, attention at 8x8."""
  config = cifar10.get_config()
  config.data.image_size = 16
  config.model.update(
    {**dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,)), **model}
  )
  return config


def random_params(config, seed: int) -> dict:
  """Random params of the config's U-Net: no layer near zero or identity (numpy draws)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in matching.variable_shapes(config).items():
    fan_in = math.prod(leaf.shape[:-1]) if path.endswith("/kernel") else 1
    value = rng.normal(size=leaf.shape) / math.sqrt(fan_in) * (1.0 if fan_in > 1 else 0.1)
    flat[path] = (value + (path.endswith("/scale"))).astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep="/")


def flat(params) -> dict:
  return traverse_util.flatten_dict(params, sep="/")


def assert_params_equal(actual, expected):
  a, e = flat(actual), flat(expected)
  assert sorted(a) == sorted(e)
  for path in e:
    assert a[path].dtype == np.float32, path
    np.testing.assert_array_equal(np.asarray(a[path]), e[path], err_msg=path)


def inputs(config, batch: int = 2, seed: int = 3):
  rng = np.random.default_rng(seed)
  size, channels = config.data.image_size, config.data.num_channels
  x = rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32)
  return x, np.array([0, 617][:batch], np.int32)


def apply(config, params, x, t) -> np.ndarray:
  return np.asarray(jax.jit(model_bundle.create_model(config).apply)({"params": params}, x, t))


# -- The original's names, written out independently of ddpm_jax. -----------------------------


def original_variable_shapes(
  ch, ch_mult, num_res_blocks, attn_resolutions, resolution, in_ch, out_ch
) -> dict[str, tuple]:
  """Name -> shape of every variable that diffusion_tf/models/unet.py `model` creates."""
  shapes = {}

  def dense(scope, n_in, n_out):  # nn.dense and nn.nin: W [in_dim, num_units].
    shapes.update({f"model/{scope}/W": (n_in, n_out), f"model/{scope}/b": (n_out,)})

  def conv(scope, n_in, n_out):  # nn.conv2d: W [filter, filter, in_dim, num_units].
    shapes.update({f"model/{scope}/W": (3, 3, n_in, n_out), f"model/{scope}/b": (n_out,)})

  def norm(scope, c):  # tf.contrib.layers.group_norm.
    shapes.update({f"model/{scope}/gamma": (c,), f"model/{scope}/beta": (c,)})

  def resnet_block(scope, c_in, c_out):
    norm(f"{scope}/norm1", c_in)
    conv(f"{scope}/conv1", c_in, c_out)
    dense(f"{scope}/temb_proj", 4 * ch, c_out)
    norm(f"{scope}/norm2", c_out)
    conv(f"{scope}/conv2", c_out, c_out)
    if c_in != c_out:
      dense(f"{scope}/nin_shortcut", c_in, c_out)

  def attn_block(scope, c):
    norm(f"{scope}/norm", c)
    for name in ("q", "k", "v", "proj_out"):
      dense(f"{scope}/{name}", c, c)

  dense("temb/dense0", ch, 4 * ch)
  dense("temb/dense1", 4 * ch, 4 * ch)
  conv("conv_in", in_ch, ch)
  hs, c, res = [ch], ch, resolution
  for i, mult in enumerate(ch_mult):
    for j in range(num_res_blocks):
      resnet_block(f"down_{i}/block_{j}", c, ch * mult)
      c = ch * mult
      if res in attn_resolutions:
        attn_block(f"down_{i}/attn_{j}", c)
      hs.append(c)
    if i != len(ch_mult) - 1:
      conv(f"down_{i}/downsample/conv", c, c)
      hs.append(c)
      res //= 2
  resnet_block("mid/block_1", c, c)
  attn_block("mid/attn_1", c)
  resnet_block("mid/block_2", c, c)
  for i in reversed(range(len(ch_mult))):
    for j in range(num_res_blocks + 1):
      resnet_block(f"up_{i}/block_{j}", c + hs.pop(), ch * ch_mult[i])
      c = ch * ch_mult[i]
      if res in attn_resolutions:
        attn_block(f"up_{i}/attn_{j}", c)
    if i != 0:
      conv(f"up_{i}/upsample/conv", c, c)
      res *= 2
  norm("norm_out", c)
  conv("conv_out", c, out_ch)
  return shapes


def test_cifar10_names_and_shapes_are_the_original_328_variables():
  expected = original_variable_shapes(128, (1, 2, 2, 2), 2, (16,), 32, 3, 3)
  ours = matching.variable_shapes(cifar10.get_config())
  assert len(ours) == len(expected) == 328
  assert {tf1.tf_name(p): tuple(s.shape) for p, s in ours.items()} == expected
  assert sum(math.prod(s) for s in expected.values()) == 35_746_307
  assert all(tf1.path_from_tf_name(tf1.tf_name(p)) == p for p in ours)
  assert tf1.tf_name("down_1/attn_0/norm/scale") == "model/down_1/attn_0/norm/gamma"
  assert tf1.tf_name("up_3/block_0/nin_shortcut/kernel") == "model/up_3/block_0/nin_shortcut/W"
  assert expected["model/up_3/block_0/nin_shortcut/W"] == (512, 256)


# -- TF1 checkpoints. --------------------------------------------------------------------------


def write_tf1_checkpoint(directory, raw: dict, ema: dict | None, step: int) -> str:
  """A TF1 name-based checkpoint like the original's (`tf.compat.v1` variables in a graph, saved by
  `Saver`): `model/...` variables, their EMA shadows named by `tf.train.ExponentialMovingAverage`
  itself, plus an Adam slot and the global step (the import ignores both)."""
  values = {}

  def variable(name, value):
    scope, _, leaf = name.rpartition("/")
    with TF1.variable_scope(scope or TF1.get_variable_scope()):
      v = TF1.get_variable(leaf, shape=value.shape, dtype=tf.as_dtype(value.dtype))
    assert v.op.name == name
    values[v] = value
    return v

  with tf.Graph().as_default():
    averager = TF1.train.ExponentialMovingAverage(decay=0.9999)
    for name, value in raw.items():
      v = variable(name, value)
      if ema is not None:  # Building the graph of averager.apply() would take seconds.
        variable(averager.average_name(v), ema[name])
    variable("model/conv_in/W/Adam", np.ones_like(raw["model/conv_in/W"]))
    variable("global_step", np.int64(step))
    feeds = {v: TF1.placeholder(v.dtype.base_dtype, v.shape) for v in values}
    assign = tf.group(*[v.assign(feeds[v]) for v in values])
    with TF1.Session() as sess:
      sess.run(assign, {feeds[v]: value for v, value in values.items()})
      return TF1.train.Saver().save(sess, os.path.join(directory, "model.ckpt"), step)


@pytest.fixture(scope="module")
def tf_checkpoint(tmp_path_factory):
  """(prefix, raw params, EMA params) of a TF1 checkpoint of `tiny_config()` at step 1234."""
  config = tiny_config()
  raw, ema = random_params(config, 0), random_params(config, 1)
  directory = str(tmp_path_factory.mktemp("tf1"))
  prefix = write_tf1_checkpoint(directory, tf1.to_tf_names(raw), tf1.to_tf_names(ema), 1234)
  return prefix, raw, ema


def test_tf1_checkpoint_imports_the_ema_weights_exactly(tf_checkpoint):
  prefix, raw, ema = tf_checkpoint
  names = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
  assert "model/down_1/attn_0/q/W/ExponentialMovingAverage" in names  # TF's own EMA naming.
  assert "model/conv_in/W/Adam" in names and "global_step" in names  # Ignored by the import.
  assert prefix.endswith("model.ckpt-1234") and tf1.tf_checkpoint_step(prefix) == 1234
  assert_params_equal(convert.from_tf_checkpoint(prefix, tiny_config()), ema)
  assert_params_equal(convert.from_tf_checkpoint(os.path.dirname(prefix), tiny_config()), ema)
  assert_params_equal(convert.from_tf_checkpoint(prefix, tiny_config(), use_ema=False), raw)


def test_a_corrupt_tf_checkpoint_ends_in_one_line_naming_it(tmp_path):
  prefix = str(tmp_path / "model.ckpt-5")
  with open(prefix + ".index", "wb") as f:
    f.write(b"not an sstable" * 20)
  with open(prefix + ".data-00000-of-00001", "wb") as f:
    f.write(b"junk")
  with pytest.raises(convert.ConversionError) as info:
    convert.from_tf_checkpoint(prefix, tiny_config())
  assert str(info.value).startswith(f"{prefix}: not a readable TF checkpoint (")
  assert "bad magic number" in str(info.value) and "\n" not in str(info.value)


def test_tf1_checkpoint_without_ema_copies_imports_the_raw_weights(tmp_path):
  config = tiny_config()
  raw = random_params(config, 4)
  prefix = write_tf1_checkpoint(str(tmp_path), tf1.to_tf_names(raw), None, 7)
  assert_params_equal(convert.from_tf_checkpoint(prefix, config), raw)


# A re-implementation of diffusion_tf/models/unet.py's forward pass with TF ops on the
# original's variable names, independent of ddpm_jax (TF "SAME" padding, the original resize).


def tf_reference_unet(w, x, t, ch, ch_mult, num_res_blocks, attn_resolutions) -> np.ndarray:
  def dense(h, scope):
    return tf.tensordot(h, w[f"model/{scope}/W"], 1) + w[f"model/{scope}/b"]

  def conv(h, scope, stride=1):
    return (
      tf.nn.conv2d(h, w[f"model/{scope}/W"], [1, stride, stride, 1], "SAME") + w[f"model/{scope}/b"]
    )

  def norm(h, scope):
    b, height, width, c = h.shape
    g = tf.reshape(h, [b, height, width, 32, c // 32])
    mean, var = tf.nn.moments(g, axes=[1, 2, 4], keepdims=True)
    g = tf.reshape((g - mean) * tf.math.rsqrt(var + 1e-6), [b, height, width, c])
    return g * w[f"model/{scope}/gamma"] + w[f"model/{scope}/beta"]

  def resnet_block(h, scope, temb, out_ch=None):
    out_ch = out_ch or h.shape[-1]
    y = conv(tf.nn.swish(norm(h, f"{scope}/norm1")), f"{scope}/conv1")
    y += dense(tf.nn.swish(temb), f"{scope}/temb_proj")[:, None, None, :]
    y = conv(tf.nn.swish(norm(y, f"{scope}/norm2")), f"{scope}/conv2")
    if h.shape[-1] != out_ch:
      h = dense(h, f"{scope}/nin_shortcut")
    return h + y

  def attn_block(h, scope):
    b, height, width, c = h.shape
    y = norm(h, f"{scope}/norm")
    q, k, v = (dense(y, f"{scope}/{n}") for n in "qkv")
    a = tf.einsum("bhwc,bHWc->bhwHW", q, k) * (int(c) ** (-0.5))
    a = tf.reshape(
      tf.nn.softmax(tf.reshape(a, [b, height, width, height * width])),
      [b, height, width, height, width],
    )
    return h + dense(tf.einsum("bhwHW,bHWc->bhwc", a, v), f"{scope}/proj_out")

  half = ch // 2
  freqs = tf.exp(tf.range(half, dtype=tf.float32) * -(math.log(10000) / (half - 1)))
  temb = tf.cast(t, tf.float32)[:, None] * freqs[None, :]
  temb = tf.concat([tf.sin(temb), tf.cos(temb)], axis=1)
  temb = dense(tf.nn.swish(dense(temb, "temb/dense0")), "temb/dense1")
  hs = [conv(x, "conv_in")]
  for i, mult in enumerate(ch_mult):
    for j in range(num_res_blocks):
      h = resnet_block(hs[-1], f"down_{i}/block_{j}", temb, ch * mult)
      if h.shape[1] in attn_resolutions:
        h = attn_block(h, f"down_{i}/attn_{j}")
      hs.append(h)
    if i != len(ch_mult) - 1:
      hs.append(conv(hs[-1], f"down_{i}/downsample/conv", stride=2))
  h = resnet_block(hs[-1], "mid/block_1", temb)
  h = resnet_block(attn_block(h, "mid/attn_1"), "mid/block_2", temb)
  for i in reversed(range(len(ch_mult))):
    for j in range(num_res_blocks + 1):
      h = resnet_block(
        tf.concat([h, hs.pop()], axis=-1), f"up_{i}/block_{j}", temb, ch * ch_mult[i]
      )
      if h.shape[1] in attn_resolutions:
        h = attn_block(h, f"up_{i}/attn_{j}")
    if i != 0:
      size = [2 * h.shape[1], 2 * h.shape[2]]
      h = conv(
        TF1.image.resize(
          h, size, method=TF1.image.ResizeMethod.NEAREST_NEIGHBOR, align_corners=True
        ),
        f"up_{i}/upsample/conv",
      )
  return conv(tf.nn.swish(norm(h, "norm_out")), "conv_out").numpy()


def test_imported_model_matches_the_original_forward_pass(tf_checkpoint):
  prefix, _, ema = tf_checkpoint
  config = tiny_config()
  reader = tf.train.load_checkpoint(prefix)
  original = {
    name[: -len(tf1.EMA_SUFFIX)]: reader.get_tensor(name)
    for name in reader.get_variable_to_shape_map()
    if name.endswith(tf1.EMA_SUFFIX)
  }
  x, t = inputs(config)
  reference = tf_reference_unet(original, x, t, 32, (1, 2), 1, (8,))
  ours = apply(config, convert.from_tf_checkpoint(prefix, config), x, t)
  assert ours.shape == (2, 16, 16, 3) and np.abs(reference).mean() > 0.1
  np.testing.assert_allclose(ours, apply(config, ema, x, t), rtol=0, atol=1e-4)
  np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)


def test_mismatched_weights_end_in_one_message_naming_every_problem(tf_checkpoint):
  prefix = tf_checkpoint[0]
  # Two ResBlocks per level instead of one, attention at 16x16 instead of 8x8, 6 output channels.
  config = tiny_config(num_res_blocks=2, attn_resolutions=(16,), out_ch=6)
  with pytest.raises(convert.ConversionError) as info:
    convert.from_tf_checkpoint(prefix, config)
  message = str(info.value)
  assert "does not fit the U-Net of the config (ch=32, ch_mult=(1, 2), num_res_blocks=2" in message
  # Two more blocks per level and attention at level 0: 94 variables, listed by their EMA name.
  assert "missing (94):\n    model/down_0/attn_0/k/b/ExponentialMovingAverage\n" in message
  assert "\n    ... and 84 more\n" in message  # Each list shows at most 10 names.
  assert "unexpected (30):\n    model/down_1/attn_0/k/W/ExponentialMovingAverage\n" in message
  assert "mis-shaped (6):" in message
  assert "conv_out/W/ExponentialMovingAverage: (3, 3, 32, 3), expected (3, 3, 32, 6)" in message
  assert (
    "up_1/block_1/nin_shortcut/W/ExponentialMovingAverage: (96, 64), expected (128, 64)" in message
  )
  assert message.endswith(
    "The weights hold a U-Net with ch=32, ch_mult=(1, 2), num_res_blocks=1, attention at "
    "level(s) (1,), 3 input and 3 output channels; convert them with --config=configs/cifar10.py "
    "--config.model.ch=32 --config.model.ch_mult='(1, 2)' --config.model.num_res_blocks=1 or "
    "--config=configs/digits.py --config.model.num_res_blocks=1 --config.data.num_channels=3 "
    "--config.model.out_ch=3."
  )


@pytest.mark.parametrize("name", ["cifar10", "cifar10_conditional"])
def test_the_error_names_the_config_of_full_size_weights(name):
  """A CIFAR-10 state dict (shapes only) against the wrong config names its config: the
  class-conditional one when the weights hold a class embedding."""
  shapes = matching.variable_shapes(importlib.import_module(f"configs.{name}").get_config())
  state_dict = {
    diffusers_weights.diffusers_key(p, 4): np.broadcast_to(
      np.float32(0), diffusers_weights.torch_shape(p, tuple(s.shape))
    )
    for p, s in shapes.items()
  }
  with pytest.raises(convert.ConversionError, match=rf"with --config=configs/{name}\.py\.$"):
    convert.from_diffusers(state_dict, tiny_config())


# -- diffusers. --------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["new", "old"])
def test_diffusers_state_dict_round_trip(attention):
  config = tiny_config()
  params = random_params(config, 5)
  state_dict = diffusers_weights.to_diffusers_state_dict(params, attention)
  assert state_dict["conv_in.weight"].shape == (32, 3, 3, 3)
  assert state_dict["time_embedding.linear_1.weight"].shape == (128, 32)
  assert state_dict["down_blocks.1.resnets.0.conv_shortcut.weight"].shape == (64, 32, 1, 1)
  q = {"new": "to_q", "old": "query"}[attention]
  np.testing.assert_array_equal(
    state_dict[f"up_blocks.0.attentions.1.{q}.weight"], flat(params)["up_1/attn_1/q/kernel"].T
  )
  np.testing.assert_array_equal(
    state_dict["up_blocks.1.resnets.1.conv2.weight"],
    flat(params)["up_0/block_1/conv2/kernel"].transpose(3, 2, 0, 1),
  )
  assert "up_blocks.0.upsamplers.0.conv.bias" in state_dict
  assert "down_blocks.0.downsamplers.0.conv.weight" in state_dict
  assert_params_equal(convert.from_diffusers(state_dict, config), params)


def test_diffusers_mixed_attention_styles_are_refused():
  config = tiny_config()
  state_dict = diffusers_weights.to_diffusers_state_dict(random_params(config, 5), "new")
  state_dict["mid_block.attentions.0.query.weight"] = state_dict.pop(
    "mid_block.attentions.0.to_q.weight"
  )
  with pytest.raises(convert.ConversionError, match="(?s)missing.*unexpected"):
    convert.from_diffusers(state_dict, config)


def test_safetensors_round_trip_and_model_directory(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
    "a.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
    "b.bias": rng.normal(size=(5,)).astype(np.float16),
    "c": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
    "d": np.arange(6, dtype=">i8").reshape(2, 3),  # Big-endian input is written little-endian.
    "empty": np.zeros((0, 3), np.float32),
  }
  path = str(tmp_path / "w.safetensors")
  safetensors.numpy.save_file(tensors, path, {"format": "pt"})
  with safetensors.safe_open(path, framework="numpy") as f:
    assert f.metadata() == {"format": "pt"} and f.get_slice("c").get_dtype() == "BF16"
  header = files.weights_header(path)
  assert header == {
    name: (value.shape, value.dtype.newbyteorder("=")) for name, value in tensors.items()
  }
  loaded = files.read_weights(path)
  assert sorted(loaded) == sorted(tensors)
  for name, value in tensors.items():
    assert loaded[name].dtype == value.dtype.newbyteorder("=") and loaded[name].shape == value.shape
    np.testing.assert_array_equal(loaded[name], value)
  assert list(files.read_weights(path, {"c": (2, 3)})) == ["c"]  # Only what is asked for.
  with pytest.raises(
    convert.ConversionError,
    match=r"w\.safetensors: tensor 'c' has shape "
    r"\(2, 3\), expected \(3, 2\)\.$",
  ):
    files.read_weights(path, {"c": (3, 2)})
  with open(path, "rb") as f:
    raw = f.read()
  assert np.arange(6, dtype="<i8").tobytes() in raw  # "d" is stored little-endian.
  with open(path, "wb") as f:
    f.write(raw[:-4])
  with pytest.raises(
    convert.ConversionError,
    match=r"w\.safetensors: not a readable weights file "
    r"\(SafetensorError: .*file not fully covered\)$",
  ):
    files.read_weights(path)

  config = tiny_config()
  params = random_params(config, 6)
  model_dir = tmp_path / "ddpm"
  model_dir.mkdir()
  safetensors.numpy.save_file(
    diffusers_weights.to_diffusers_state_dict(params, "old"),
    str(model_dir / "diffusion_pytorch_model.safetensors"),
  )
  assert_params_equal(
    convert.from_diffusers(convert.load_diffusers_state_dict(str(model_dir)), config), params
  )
  assert_params_equal(
    convert.from_diffusers(convert.load_diffusers_state_dict(str(model_dir), config), config),
    params,
  )


def test_a_diffusers_model_directory_becomes_a_checkpoint_at_step_0(tmp_path):
  config = tiny_digits_config()
  params = random_params(config, 9)
  (tmp_path / "model").mkdir()
  safetensors.numpy.save_file(
    diffusers_weights.to_diffusers_state_dict(params),
    str(tmp_path / "model" / "diffusion_pytorch_model.safetensors"),
  )
  workdir = str(tmp_path / "workdir")
  assert convert.convert("diffusers", str(tmp_path / "model"), config, workdir) == os.path.join(
    workdir, "checkpoints", "0"
  )
  restored, step = model_bundle.ModelBundle.from_config(config).load_ema_params(workdir)
  assert step == 0
  assert_params_equal(jax.device_get(restored), params)
  with pytest.raises(FileExistsError, match="checkpoints/0 already exists"):
    convert.convert("diffusers", str(tmp_path / "model"), config, workdir)
  with pytest.raises(convert.ConversionError, match="not a .safetensors or .bin file"):
    convert.convert("diffusers", __file__, config, workdir, step=1)
  # The older torch .bin files are read without torch too.
  bin_path = str(tmp_path / "diffusion_pytorch_model.bin")
  torch_writer.save_state_dict(bin_path, diffusers_weights.to_diffusers_state_dict(params, "old"))
  assert_params_equal(
    convert.from_diffusers(convert.load_diffusers_state_dict(bin_path), config), params
  )


def ddpm_unet2d_config(
  block_out_channels, down_block_types, up_block_types, layers_per_block, sample_size
) -> dict:
  """google/ddpm-cifar10-32's UNet2DModel config, with another size."""
  return dict(
    sample_size=sample_size,
    in_channels=3,
    out_channels=3,
    block_out_channels=block_out_channels,
    layers_per_block=layers_per_block,
    down_block_types=down_block_types,
    up_block_types=up_block_types,
    attention_head_dim=None,
    norm_eps=1e-6,
    resnet_time_scale_shift="default",
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    act_fn="silu",
    norm_num_groups=32,
    center_input_sample=False,
    dropout=0.0,
  )


def test_diffusers_unet2d_model_gives_our_outputs():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.models.embeddings import get_timestep_embedding as diffusers_embedding

  full = diffusers.UNet2DModel(
    **ddpm_unet2d_config(
      (128, 256, 256, 256),
      ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
      ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
      2,
      32,
    )
  )
  ours = {
    diffusers_weights.diffusers_key(p, 4): diffusers_weights.torch_shape(p, tuple(s.shape))
    for p, s in matching.variable_shapes(cifar10.get_config()).items()
  }
  assert {k: tuple(v.shape) for k, v in full.state_dict().items()} == ours
  del full

  torch.manual_seed(0)
  model = diffusers.UNet2DModel(
    **ddpm_unet2d_config(
      (32, 64), ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"), 1, 16
    )
  ).eval()
  with torch.no_grad():  # Every weight random: none near zero or identity.
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * (0.5 / math.sqrt(max(p[0].numel(), 1))) + (p.ndim == 1) * 0.1)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  config = tiny_config()
  params = convert.from_diffusers(state_dict, config)
  x, t = inputs(config)
  with torch.no_grad():
    theirs = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample.numpy()
  theirs = theirs.transpose(0, 2, 3, 1)
  assert np.abs(theirs).mean() > 0.1
  np.testing.assert_allclose(apply(config, params, x, t), theirs, rtol=0, atol=1e-4)

  # Same formula; float32 frequencies may differ by one ulp, i.e. t * 6e-8 in the argument.
  steps = np.array([0, 1, 10, 999], np.int32)
  np.testing.assert_allclose(
    np.asarray(get_timestep_embedding(steps, 128)),
    diffusers_embedding(
      torch.from_numpy(steps), 128, flip_sin_to_cos=False, downscale_freq_shift=1
    ).numpy(),
    rtol=0,
    atol=1e-4,
  )


# -- The command line. -------------------------------------------------------------------------


def run_convert(*args, cwd=REPO) -> subprocess.CompletedProcess:
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO,
  )
  return subprocess.run(
    [sys.executable, "-m", "ddpm_jax.convert", *args],
    env=env,
    capture_output=True,
    text=True,
    cwd=cwd,
    timeout=300,
  )


def test_command_line_writes_a_checkpoint_that_sampling_loads(tmp_path):
  config = tiny_digits_config()  # 8x8x1, ch 32, ch_mult (1, 2), one ResBlock, attention at 4x4.
  raw, ema = random_params(config, 7), random_params(config, 8)
  prefix = write_tf1_checkpoint(str(tmp_path), tf1.to_tf_names(raw), tf1.to_tf_names(ema), 790000)
  workdir = str(tmp_path / "workdir")
  # Relative paths are made absolute at the command line (Orbax wants absolute ones).
  args = [
    "--source=tf",
    f"--input={os.path.relpath(prefix, tmp_path)}",
    f"--config={REPO}/configs/digits.py",
    "--config.model.num_res_blocks=1",
    "--workdir=workdir",
  ]
  done = run_convert(*args, cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"Wrote {workdir}/checkpoints/790000. Sample with: " in done.stdout
  assert done.stdout.rstrip().endswith(f" --workdir={workdir}")

  loop = train_loop.TrainLoop(config, workdir)
  restored, step = loop.bundle.load_ema_params(workdir)
  assert step == 790000
  assert_params_equal(jax.device_get(restored), ema)
  abstract = checkpointer.abstract_state(loop.init_fn, checkpointer.replicated_sharding())
  with checkpointer.Checkpointer(
    os.path.join(workdir, "checkpoints"), keep=1, every_steps=0, read_only=True
  ) as ckpt:
    state = ckpt.restore(abstract)
  assert int(state.step) == 790000
  assert_params_equal(jax.device_get(state.params), ema)  # Fine-tuning starts from the EMA too.
  assert all(int(x) == 0 for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)  # Fresh Adam.

  again = run_convert(*args[:3], "--config.model.out_ch=2", f"--workdir={workdir}", cwd=tmp_path)
  assert again.returncode == 2
  assert "790000 already exists; nothing was written" in again.stderr, again.stderr[-3000:]

  wrong = tiny_digits_config(**{"model.num_res_blocks": 2})
  with pytest.raises(convert.ConversionError, match="(?s)missing .*num_res_blocks=1"):
    convert.convert("tf", prefix, wrong, str(tmp_path / "other"))
  assert not os.path.exists(tmp_path / "other")
