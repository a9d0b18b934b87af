"""The FID Inception-v3 in Flax and its weights converter, against pytorch-fid (and torch where
installed)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_writer

from ddpm_jax.evaluation import fid, inception
from ddpm_jax.weights import convert_inception

# -- The FID Inception: architecture written out from pytorch-fid / torchvision. ----------------


def _fid_inception_convs():
  """(torch name, in, out, kh, kw, stride, (ph, pw)) of every BasicConv2d, from the sources of
  torchvision's Inception3 and pytorch-fid's FIDInceptionA/C/E_1/E_2."""
  convs = [
    ("Conv2d_1a_3x3", 3, 32, 3, 3, 2, (0, 0)),
    ("Conv2d_2a_3x3", 32, 32, 3, 3, 1, (0, 0)),
    ("Conv2d_2b_3x3", 32, 64, 3, 3, 1, (1, 1)),
    ("Conv2d_3b_1x1", 64, 80, 1, 1, 1, (0, 0)),
    ("Conv2d_4a_3x3", 80, 192, 3, 3, 1, (0, 0)),
  ]

  def block_a(n, cin, pool):
    return [
      (f"{n}.branch1x1", cin, 64, 1, 1, 1, (0, 0)),
      (f"{n}.branch5x5_1", cin, 48, 1, 1, 1, (0, 0)),
      (f"{n}.branch5x5_2", 48, 64, 5, 5, 1, (2, 2)),
      (f"{n}.branch3x3dbl_1", cin, 64, 1, 1, 1, (0, 0)),
      (f"{n}.branch3x3dbl_2", 64, 96, 3, 3, 1, (1, 1)),
      (f"{n}.branch3x3dbl_3", 96, 96, 3, 3, 1, (1, 1)),
      (f"{n}.branch_pool", cin, pool, 1, 1, 1, (0, 0)),
    ]

  def block_b(n, cin):
    return [
      (f"{n}.branch3x3", cin, 384, 3, 3, 2, (0, 0)),
      (f"{n}.branch3x3dbl_1", cin, 64, 1, 1, 1, (0, 0)),
      (f"{n}.branch3x3dbl_2", 64, 96, 3, 3, 1, (1, 1)),
      (f"{n}.branch3x3dbl_3", 96, 96, 3, 3, 2, (0, 0)),
    ]

  def block_c(n, cin, c7):
    r, c = (1, 7, 1, (0, 3)), (7, 1, 1, (3, 0))
    return [
      (f"{n}.branch1x1", cin, 192, 1, 1, 1, (0, 0)),
      (f"{n}.branch7x7_1", cin, c7, 1, 1, 1, (0, 0)),
      (f"{n}.branch7x7_2", c7, c7, *r),
      (f"{n}.branch7x7_3", c7, 192, *c),
      (f"{n}.branch7x7dbl_1", cin, c7, 1, 1, 1, (0, 0)),
      (f"{n}.branch7x7dbl_2", c7, c7, *c),
      (f"{n}.branch7x7dbl_3", c7, c7, *r),
      (f"{n}.branch7x7dbl_4", c7, c7, *c),
      (f"{n}.branch7x7dbl_5", c7, 192, *r),
      (f"{n}.branch_pool", cin, 192, 1, 1, 1, (0, 0)),
    ]

  def block_d(n, cin):
    return [
      (f"{n}.branch3x3_1", cin, 192, 1, 1, 1, (0, 0)),
      (f"{n}.branch3x3_2", 192, 320, 3, 3, 2, (0, 0)),
      (f"{n}.branch7x7x3_1", cin, 192, 1, 1, 1, (0, 0)),
      (f"{n}.branch7x7x3_2", 192, 192, 1, 7, 1, (0, 3)),
      (f"{n}.branch7x7x3_3", 192, 192, 7, 1, 1, (3, 0)),
      (f"{n}.branch7x7x3_4", 192, 192, 3, 3, 2, (0, 0)),
    ]

  def block_e(n, cin):
    return [
      (f"{n}.branch1x1", cin, 320, 1, 1, 1, (0, 0)),
      (f"{n}.branch3x3_1", cin, 384, 1, 1, 1, (0, 0)),
      (f"{n}.branch3x3_2a", 384, 384, 1, 3, 1, (0, 1)),
      (f"{n}.branch3x3_2b", 384, 384, 3, 1, 1, (1, 0)),
      (f"{n}.branch3x3dbl_1", cin, 448, 1, 1, 1, (0, 0)),
      (f"{n}.branch3x3dbl_2", 448, 384, 3, 3, 1, (1, 1)),
      (f"{n}.branch3x3dbl_3a", 384, 384, 1, 3, 1, (0, 1)),
      (f"{n}.branch3x3dbl_3b", 384, 384, 3, 1, 1, (1, 0)),
      (f"{n}.branch_pool", cin, 192, 1, 1, 1, (0, 0)),
    ]

  convs += block_a("Mixed_5b", 192, 32) + block_a("Mixed_5c", 256, 64)
  convs += block_a("Mixed_5d", 288, 64) + block_b("Mixed_6a", 288)
  for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    convs += block_c(name, 768, c7)
  convs += block_d("Mixed_7a", 768) + block_e("Mixed_7b", 1280) + block_e("Mixed_7c", 2048)
  return convs


def _pytorch_fid_shapes():
  """pytorch-fid's state-dict keys -> shapes, from the table above."""
  shapes = {}
  for name, cin, cout, kh, kw, _, _ in _fid_inception_convs():
    shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{leaf}"] = (cout,)
  shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
  return shapes


INCEPTION_NUM_PARAMS = 23_850_960  # Conv kernels, BN scale/bias and fc (not running stats).


def test_inception_parameter_count_and_names_match_pytorch_fid():
  table = _fid_inception_convs()
  from_table = sum(o * i * kh * kw + 2 * o for _, i, o, kh, kw, _, _ in table) + 2048 * 1008 + 1008
  assert from_table == INCEPTION_NUM_PARAMS
  # torchvision's inception_v3 without aux logits has 23,834,568 with a 1000-way fc.
  assert INCEPTION_NUM_PARAMS - 8 * 2049 == 23_834_568
  shapes = inception.variable_shapes()
  count = lambda prefix: sum(math.prod(s) for k, s in shapes.items() if k.startswith(prefix))
  assert count("params/") == INCEPTION_NUM_PARAMS
  assert count("batch_stats/") == 2 * sum(o for _, _, o, *_ in table)
  assert convert_inception.expected_torch_shapes() == _pytorch_fid_shapes()


def test_inception_output_shapes():
  variables = jax.eval_shape(
    inception.FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3))
  )
  pool, logits = jax.eval_shape(
    inception.FIDInceptionV3().apply, variables, jnp.zeros((2, 299, 299, 3))
  )
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)


def _torch_bilinear_resize(images, size):
  """numpy F.interpolate(mode='bilinear', align_corners=False) of [N, H, W, C] to size x size."""

  def axis_weights(n_in):
    src = np.maximum((np.arange(size) + 0.5) * (n_in / size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    w = np.zeros((size, n_in))
    np.add.at(w, (np.arange(size), i0), 1 - lam)
    np.add.at(w, (np.arange(size), i1), lam)
    return w

  wh, ww = axis_weights(images.shape[1]), axis_weights(images.shape[2])
  return np.einsum("ah,nhwc,bw->nabc", wh, images.astype(np.float64), ww, optimize=True)


@pytest.mark.parametrize("size", [32, 8, 400])
def test_preprocess_resizes_like_torch_bilinear_and_scales_to_unit_range(size):
  images = np.random.default_rng(9).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  expected = _torch_bilinear_resize(images, 299) / 127.5 - 1
  got = np.asarray(inception.preprocess(images))
  assert got.shape == (2, 299, 299, 3)
  # float32 source coordinates (in jax and in torch) allow ~1e-4 of 2 / 255 per pixel step.
  np.testing.assert_allclose(got, expected, atol=1e-4)
  gray = np.asarray(inception.preprocess(images[..., :1]))
  np.testing.assert_allclose(gray, np.repeat(expected[..., :1], 3, -1), atol=1e-4)


def test_avg_pool_branch_does_not_count_padding():
  x = jnp.ones((1, 5, 5, 2))
  np.testing.assert_allclose(np.asarray(inception._avg_pool_3x3(x)), 1.0)  # Padded: corner 4/9.


def test_missing_weights_error_says_what_to_do(tmp_path):
  missing = str(tmp_path / "nowhere.npz")
  for path in ("", missing):
    with pytest.raises(inception.MissingWeightsError) as info:
      inception.InceptionFeatures(path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "github.com/mseitzer" in message
    assert "python -m ddpm_jax.weights.convert_inception --input=" in message
    assert "--output=" in message and "--config.eval.inception_weights=" in message
  assert missing in message


# -- The converter and InceptionFeatures on a synthetic pytorch-fid state dict. ----------------


def _synthetic_pytorch_fid_state_dict():
  """The exact keys and shapes of pt_inception-2015-12-05, random scale-preserving values."""
  rng = np.random.default_rng(11)
  state_dict = {}
  for key, shape in _pytorch_fid_shapes().items():
    if key.endswith("running_var"):
      value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("conv.weight") or key == "fc.weight":
      value = rng.standard_normal(shape) / np.sqrt(math.prod(shape[1:]))
    else:
      value = 0.1 * rng.standard_normal(shape)
    state_dict[key] = value.astype(np.float32)
    if key.endswith("running_var"):
      state_dict[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  return state_dict


@pytest.fixture(scope="module")
def fid_state_dict():
  return _synthetic_pytorch_fid_state_dict()


@pytest.fixture(scope="module")
def converted_weights(fid_state_dict, tmp_path_factory):
  """(path of the .pth, path of the .npz converted by the CLI)."""
  folder = tmp_path_factory.mktemp("inception")
  pth, npz = str(folder / "pt_inception.pth"), str(folder / "inception_fid.npz")
  torch_writer.save_state_dict(pth, fid_state_dict)
  assert convert_inception.main([f"--input={pth}", f"--output={npz}"]) == 0
  return pth, npz


def test_converter_maps_pytorch_fid_keys(fid_state_dict, converted_weights):
  features = inception.InceptionFeatures(converted_weights[1], batch_size=2)
  params, stats = features.variables["params"], features.variables["batch_stats"]
  np.testing.assert_array_equal(
    params["Conv2d_1a_3x3"]["conv"]["kernel"],
    fid_state_dict["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"][0, :, 5, 7],
    fid_state_dict["Mixed_6b.branch7x7_2.conv.weight"][7, 5, 0, :],
  )
  np.testing.assert_array_equal(params["fc"]["kernel"], fid_state_dict["fc.weight"].T)
  np.testing.assert_array_equal(params["fc"]["bias"], fid_state_dict["fc.bias"])
  bn = "Mixed_7c.branch3x3dbl_3b.bn."
  np.testing.assert_array_equal(
    params["Mixed_7c"]["branch3x3dbl_3b"]["bn"]["scale"], fid_state_dict[bn + "weight"]
  )
  np.testing.assert_array_equal(
    stats["Mixed_7c"]["branch3x3dbl_3b"]["bn"]["var"], fid_state_dict[bn + "running_var"]
  )
  np.testing.assert_array_equal(
    stats["Mixed_5b"]["branch_pool"]["bn"]["mean"],
    fid_state_dict["Mixed_5b.branch_pool.bn.running_mean"],
  )


def test_inception_features_forward(fid_state_dict, converted_weights):
  features = inception.InceptionFeatures(converted_weights[1], batch_size=2)
  assert isinstance(features, fid.FeatureExtractor) and features.image_size == 299
  images = np.random.default_rng(12).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  pool, logits = features(images)  # Two batches of 2, the last padded.
  assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
  assert np.isfinite(pool).all() and pool.std() > 0
  # Default logits are OpenAI's: pool_3 @ W without the softmax bias.
  np.testing.assert_allclose(logits, pool @ fid_state_dict["fc.weight"].T, rtol=1e-4, atol=1e-5)
  pool_two, _ = features(images[1:])  # Batch composition does not change the features.
  np.testing.assert_allclose(pool_two, pool[1:], rtol=1e-4, atol=1e-6)
  biased = inception.InceptionFeatures(converted_weights[1], batch_size=2, logits="biased")
  _, logits_b = biased(images)
  np.testing.assert_allclose(
    logits_b - logits, np.broadcast_to(fid_state_dict["fc.bias"], (3, 1008)), atol=1e-4
  )


def _np_pool_3x3(x, kind):
  """numpy 3x3 stride-1 pooling with padding 1 of [N, H, W, C]: max (pad -inf) or average over
  the valid pixels only (count_include_pad=False)."""
  fill = -np.inf if kind == "max" else 0.0
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=fill)
  h, w = x.shape[1:3]
  windows = np.stack([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)])
  if kind == "max":
    return windows.max(0)
  counts = np.pad(np.ones((h, w)), 1)
  counts = sum(counts[i : i + h, j : j + w] for i in range(3) for j in range(3))
  return windows.sum(0) / counts[None, :, :, None]


def _np_basic_conv_1x1(x, params, stats):
  y = x @ params["conv"]["kernel"][0, 0]
  y = (y - stats["mean"]) / np.sqrt(stats["var"] + 1e-3) * params["bn"]["scale"] + params["bn"][
    "bias"
  ]
  return np.maximum(y, 0)


def test_pool_branches_follow_the_2015_graph(converted_weights):
  """Mixed_5b/7b average without the padding; Mixed_7c max-pools (FIDInceptionE_2)."""
  variables = inception.load_variables(converted_weights[1])
  x = np.random.default_rng(16).uniform(-1, 1, (1, 139, 139, 3)).astype(np.float32)
  _, state = inception.FIDInceptionV3().apply(
    variables, x, capture_intermediates=True, mutable=["intermediates"]
  )
  out = {
    k: np.asarray(v["__call__"][0])
    for k, v in state["intermediates"].items()
    if k != "__call__"  # The model's own output.
  }
  assert out["Mixed_7b"].shape == (1, 3, 3, 2048)  # 3x3: corners and edges see the padding.
  block_input = {
    "Mixed_5b": np.asarray(inception._max_pool_3x3_stride2(out["Conv2d_4a_3x3"])),
    "Mixed_7b": out["Mixed_7a"],
    "Mixed_7c": out["Mixed_7b"],
  }
  for block, kind, width in (
    ("Mixed_5b", "avg", 32),
    ("Mixed_7b", "avg", 192),
    ("Mixed_7c", "max", 192),
  ):
    p = variables["params"][block]["branch_pool"]
    stats = variables["batch_stats"][block]["branch_pool"]["bn"]
    expected = _np_basic_conv_1x1(_np_pool_3x3(block_input[block], kind), p, stats)
    np.testing.assert_allclose(out[block][..., -width:], expected, rtol=1e-4, atol=1e-5)


def test_converter_lists_missing_unexpected_and_misshaped_keys(fid_state_dict, tmp_path, capsys):
  tampered = dict(fid_state_dict)
  del tampered["Mixed_5b.branch5x5_1.conv.weight"]
  tampered["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
  tampered["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  with pytest.raises(convert_inception.ConversionError) as info:
    convert_inception.convert_state_dict(tampered)
  message = str(info.value)
  assert "1 missing keys:\n  Mixed_5b.branch5x5_1.conv.weight" in message
  assert "1 unexpected keys:\n  AuxLogits.fc.weight" in message
  assert "Mixed_6b.branch7x7_2.conv.weight: (128, 128, 7, 1), expected (128, 128, 1, 7)" in message
  # The CLI prints the same listing as one message and exits 2.
  small = {"fc.weight": np.zeros((1008, 2048), np.float32)}
  torch_writer.save_state_dict(tmp_path / "bad.pth", small)
  rc = convert_inception.main([f"--input={tmp_path / 'bad.pth'}", f"--output={tmp_path / 'o.npz'}"])
  err = capsys.readouterr().err
  assert rc == 2 and "missing keys" in err and "Conv2d_1a_3x3.conv.weight" in err
  assert "Traceback" not in err and not (tmp_path / "o.npz").exists()


def test_inception_features_rejects_a_foreign_npz(tmp_path):
  np.savez(tmp_path / "foreign.npz", **{"params/fc/kernel": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="does not hold FID Inception variables"):
    inception.InceptionFeatures(str(tmp_path / "foreign.npz"))


# -- Cross-checks against real PyTorch (skipped without torch). ---------------------------------


def test_resize_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  for size in (32, 400):
    images = np.random.default_rng(14).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ref = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    ref = (2 * ref - 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inception.preprocess(images)), ref, atol=1e-5)


def _torch_fid_inception(sd, images):
  """pytorch-fid's FID Inception forward written with torch.nn.functional: -> (pool, logits)."""
  import torch
  import torch.nn.functional as F

  spec = {name: (stride, pad) for name, _, _, _, _, stride, pad in _fid_inception_convs()}
  w = {k: torch.from_numpy(v) for k, v in sd.items()}

  def conv(name, x):
    stride, pad = spec[name]
    x = F.conv2d(x, w[f"{name}.conv.weight"], stride=stride, padding=pad)
    bn = lambda leaf: w[f"{name}.bn.{leaf}"]
    x = F.batch_norm(x, bn("running_mean"), bn("running_var"), bn("weight"), bn("bias"), eps=1e-3)
    return F.relu(x)

  avg = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  def chain(n, names, x):
    for branch in names:
      x = conv(f"{n}.{branch}", x)
    return x

  def block_a(n, x):
    return torch.cat(
      [
        conv(f"{n}.branch1x1", x),
        chain(n, ["branch5x5_1", "branch5x5_2"], x),
        chain(n, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], x),
        conv(f"{n}.branch_pool", avg(x)),
      ],
      1,
    )

  def block_c(n, x):
    dbl = [f"branch7x7dbl_{i}" for i in range(1, 6)]
    return torch.cat(
      [
        conv(f"{n}.branch1x1", x),
        chain(n, ["branch7x7_1", "branch7x7_2", "branch7x7_3"], x),
        chain(n, dbl, x),
        conv(f"{n}.branch_pool", avg(x)),
      ],
      1,
    )

  def block_e(n, x, pool):
    b3 = conv(f"{n}.branch3x3_1", x)
    d3 = chain(n, ["branch3x3dbl_1", "branch3x3dbl_2"], x)
    pooled = avg(x) if pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
    return torch.cat(
      [
        conv(f"{n}.branch1x1", x),
        conv(f"{n}.branch3x3_2a", b3),
        conv(f"{n}.branch3x3_2b", b3),
        conv(f"{n}.branch3x3dbl_3a", d3),
        conv(f"{n}.branch3x3dbl_3b", d3),
        conv(f"{n}.branch_pool", pooled),
      ],
      1,
    )

  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
  for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
    x = conv(name, x)
  x = F.max_pool2d(x, 3, stride=2)
  x = F.max_pool2d(conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", x)), 3, stride=2)
  x = block_a("Mixed_5d", block_a("Mixed_5c", block_a("Mixed_5b", x)))
  x = torch.cat(
    [
      conv("Mixed_6a.branch3x3", x),
      chain("Mixed_6a", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], x),
      F.max_pool2d(x, 3, stride=2),
    ],
    1,
  )
  for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = block_c(name, x)
  x = torch.cat(
    [
      chain("Mixed_7a", ["branch3x3_1", "branch3x3_2"], x),
      chain("Mixed_7a", [f"branch7x7x3_{i}" for i in range(1, 5)], x),
      F.max_pool2d(x, 3, stride=2),
    ],
    1,
  )
  x = block_e("Mixed_7c", block_e("Mixed_7b", x, "avg"), "max")
  pool = x.mean(dim=(2, 3))
  return pool.numpy(), F.linear(pool, w["fc.weight"], w["fc.bias"]).numpy()


def test_inception_matches_a_torch_forward_of_the_same_state_dict(
  fid_state_dict, converted_weights
):
  torch = pytest.importorskip("torch")
  loaded = torch.load(converted_weights[0], weights_only=True)  # Real torch reads our .pth.
  images = np.random.default_rng(15).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  with torch.no_grad():
    ref_pool, ref_logits = _torch_fid_inception({k: v.numpy() for k, v in loaded.items()}, images)
  pool, logits = inception.InceptionFeatures(converted_weights[1], logits="biased")(images)
  # Agreement is ~2e-7 relative; an average pool in Mixed_7c or counting the padding in the
  # average pools would each be off by ~1e-4.
  np.testing.assert_allclose(pool, ref_pool, atol=1e-5 * np.abs(ref_pool).max())
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5 * np.abs(ref_logits).max())
