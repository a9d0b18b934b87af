"""Tests of ddpm_jax.metrics: FID and IS against closed forms, the FID Inception's architecture,
the torch-free .pth reader/writer, the weight converter, and the digits feature net.

Tests marked by `pytest.importorskip("torch")` are extra cross-checks against real PyTorch; every
property they check is also checked here without torch.
"""

import io
import math
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ddpm_jax.metrics import convert_inception, digits_features, fid, inception, torch_pickle

# -- Fréchet distance. -------------------------------------------------------------------------


def _random_spd(rng, dim, scale=1.0):
  a = rng.standard_normal((dim, dim))
  return scale * (a @ a.T / dim + 0.1 * np.eye(dim))


def _psd_sqrt_by_eigh(matrix):
  """Independent PSD square root: V diag(sqrt(lambda)) V^T."""
  w, v = np.linalg.eigh(matrix)
  return v @ np.diag(np.sqrt(np.maximum(w, 0))) @ v.T


def _closed_form_fid(mu1, s1, mu2, s2):
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^(1/2) S2 S1^(1/2))^(1/2)) by eigendecompositions."""
  r1 = _psd_sqrt_by_eigh(s1)
  cross = _psd_sqrt_by_eigh(r1 @ s2 @ r1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def test_fid_of_a_set_against_itself_is_zero():
  features = np.random.default_rng(0).standard_normal((400, 32)) * 3 + 1
  mu, sigma = fid.compute_statistics(features)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
  assert abs(fid.fid_from_features(features, features.copy())) < 1e-6


def test_compute_statistics_is_mean_and_unbiased_covariance():
  features = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
  mu, sigma = fid.compute_statistics(features)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (4, 4)
  centred = features.astype(np.float64) - features.astype(np.float64).mean(0)
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
  with pytest.raises(ValueError, match="N >= 2"):
    fid.compute_statistics(features[:1])


def test_fid_of_diagonal_gaussians_matches_closed_form():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  a, b = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-10)
  # Commuting (same eigenbasis) covariances: the same formula on the eigenvalues.
  q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-8)
  # Scalar case: (mu1 - mu2)^2 + (s1 - s2)^2 for standard deviations s.
  assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_general_gaussians_matches_eigendecomposition_form(method):
  rng = np.random.default_rng(3)
  dim = 20
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim, scale=2.0)
  expected = _closed_form_fid(mu1, s1, mu2, s2)
  assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)
  assert fid.frechet_distance(mu2, s2, mu1, s1, method=method) == pytest.approx(expected, rel=1e-9)


def test_sqrtm_psd_matches_scipy():
  rng = np.random.default_rng(4)
  matrix = _random_spd(rng, 30)
  root = fid.sqrtm_psd(matrix)
  np.testing.assert_allclose(root, scipy.linalg.sqrtm(matrix).real, atol=1e-10)
  np.testing.assert_allclose(root @ root, matrix, atol=1e-10)
  np.testing.assert_allclose(root, root.T, atol=1e-12)
  s2 = _random_spd(rng, 30)
  expected = np.trace(scipy.linalg.sqrtm(matrix @ s2)).real
  assert fid.trace_sqrt_product_eigh(matrix, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_with_singular_covariances_stays_finite():
  rng = np.random.default_rng(5)
  # 20 samples in 50 dimensions: both covariances have rank 19.
  f1, f2 = rng.standard_normal((20, 50)), rng.standard_normal((20, 50)) + 0.5
  mu1, s1 = fid.compute_statistics(f1)
  mu2, s2 = fid.compute_statistics(f2)
  value = fid.frechet_distance(mu1, s1, mu2, s2)
  exact = fid.frechet_distance(mu1, s1, mu2, s2, method="eigh")
  assert math.isfinite(value) and value > 0
  assert value == pytest.approx(exact, rel=0.05)
  mu, s = fid.compute_statistics(f1)
  assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-2 * np.trace(s)


def test_fid_falls_back_to_eps_offset_when_sqrtm_fails(monkeypatch):
  rng = np.random.default_rng(6)
  s1, s2 = _random_spd(rng, 5), _random_spd(rng, 5)
  mu = np.zeros(5)
  real_sqrtm, calls = scipy.linalg.sqrtm, []

  def failing_first(matrix):
    calls.append(matrix)
    return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

  monkeypatch.setattr(scipy.linalg, "sqrtm", failing_first)
  value = fid.frechet_distance(mu, s1, mu, s2, eps=1e-3)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(5)) @ (s2 + 1e-3 * np.eye(5)))
  # As in TTUR, the offset enters only the square root, not Tr(S1) + Tr(S2).
  offset = 1e-3 * np.eye(5)
  expected = _closed_form_fid(mu, s1 + offset, mu, s2 + offset) - 2 * np.trace(offset)
  assert value == pytest.approx(expected, rel=1e-9)


def test_fid_rejects_large_imaginary_parts_and_bad_shapes(monkeypatch):
  eye = np.eye(3)
  monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: m + 1j * np.eye(len(m)))
  with pytest.raises(ValueError, match="imaginary"):
    fid.frechet_distance(np.zeros(3), eye, np.zeros(3), eye)
  monkeypatch.undo()
  with pytest.raises(ValueError, match="Mismatched"):
    fid.frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))


def test_statistics_round_trip(tmp_path):
  rng = np.random.default_rng(7)
  mu, sigma = rng.standard_normal(8), _random_spd(rng, 8)
  path = str(tmp_path / "sub" / "stats.npz")
  fid.save_statistics(path, mu, sigma)
  mu2, sigma2 = fid.load_statistics(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  np.savez(tmp_path / "other.npz", x=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    fid.load_statistics(str(tmp_path / "other.npz"))


# -- Inception Score. --------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
  mean, std = fid.inception_score(np.zeros((100, 1008)))
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("num_classes", [10, 1008])
def test_inception_score_of_confident_balanced_predictions_is_num_classes(num_classes):
  n = num_classes * 10
  labels = np.arange(n) % num_classes  # Every consecutive split holds each class equally often.
  logits = 100.0 * np.eye(num_classes)[labels]
  mean, std = fid.inception_score(logits, num_splits=10)
  assert mean == pytest.approx(num_classes, rel=1e-6) and std == pytest.approx(0, abs=1e-6)
  # One class only: no diversity, IS = 1.
  assert fid.inception_score(100.0 * np.eye(num_classes)[np.zeros(n, int)])[0] == pytest.approx(1)


def test_inception_score_matches_entropy_form():
  """IS = exp(H(p(y)) - E_x H(p(y|x))) per split, computed with scipy on random logits; splits
  at OpenAI's boundaries i * N // splits (301 -> 100, 100, 101, unlike np.array_split)."""
  from scipy import special, stats

  logits = np.random.default_rng(8).standard_normal((301, 7)) * 2
  probs = special.softmax(logits, axis=1)
  scores = [
    np.exp(stats.entropy(part.mean(0)) - np.mean([stats.entropy(p) for p in part]))
    for part in (probs[:100], probs[100:200], probs[200:])
  ]
  mean, std = fid.inception_score(logits, num_splits=3)
  assert mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-8)


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
    assert "python -m ddpm_jax.metrics.convert_inception --input=" in message
    assert "--output=" in message and "--config.eval.inception_weights=" in message
  assert missing in message


# -- The torch-free .pth reader and writer. ----------------------------------------------------


def _sample_state_dict():
  rng = np.random.default_rng(10)
  base = rng.standard_normal((4, 6)).astype(np.float32)
  return {
    "conv.weight": rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
    "base": base,
    "transposed": base.T,  # A non-contiguous view of `base`: shares its storage.
    "strided": base[1:, ::2],  # Offset 6, strides (6, 2).
    "double": rng.standard_normal(5),
    "half": rng.standard_normal((2, 2)).astype(np.float16),
    "steps": np.array(12345678901, dtype=np.int64),  # 0-d, past int32.
    "int32": np.arange(-3, 3, dtype=np.int32),
    "bytes": np.arange(7, dtype=np.uint8),
    "mask": np.array([True, False, True]),
    "empty": np.zeros((0, 3), np.float32),
  }


@pytest.mark.parametrize("legacy_format", [False, True])
def test_torch_pickle_round_trip(tmp_path, legacy_format):
  state_dict = _sample_state_dict()
  path = tmp_path / "sd.pth"
  torch_pickle.save_state_dict(path, state_dict, legacy_format=legacy_format)
  loaded = torch_pickle.load_state_dict(path)
  assert list(loaded) == list(state_dict)
  for key, value in state_dict.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
    np.testing.assert_array_equal(loaded[key], value)
  assert zipfile.is_zipfile(path) != legacy_format


def test_torch_pickle_zip_layout_matches_torch(tmp_path):
  path = tmp_path / "weights.pth"
  torch_pickle.save_state_dict(path, _sample_state_dict())
  raw = path.read_bytes()
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    assert names[0] == "weights/data.pkl" and "weights/version" in names
    # The three views of `base` share one storage: 11 tensors, 9 storages.
    assert sum(n.startswith("weights/data/") for n in names) == 9
    for info in archive.infolist():
      name_len, extra_len = np.frombuffer(
        raw[info.header_offset + 26 : info.header_offset + 30], "<u2"
      )
      assert (info.header_offset + 30 + int(name_len) + int(extra_len)) % 64 == 0, info.filename
    pickled = archive.read("weights/data.pkl")
  assert b"torch._utils\n_rebuild_tensor_v2" in pickled and b"torch\nFloatStorage" in pickled


def test_torch_pickle_refuses_other_globals(tmp_path):
  class Evil:
    def __reduce__(self):
      import os

      return (os.system, ("echo pwned",))

  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
  (tmp_path / "evil.pth").write_bytes(buffer.getvalue())
  with pytest.raises(torch_pickle.TorchFileError, match=r"evil\.pth: .*Refusing to load global "
                     r"(posix|nt)\.system: only state dicts of tensors"):
    torch_pickle.load(tmp_path / "evil.pth")
  (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
  with pytest.raises(torch_pickle.TorchFileError, match=r"junk\.pth: not a PyTorch zip or legacy"):
    torch_pickle.load(tmp_path / "junk.pth")


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
  torch_pickle.save_state_dict(pth, fid_state_dict)
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
  torch_pickle.save_state_dict(tmp_path / "bad.pth", small)
  rc = convert_inception.main([f"--input={tmp_path / 'bad.pth'}", f"--output={tmp_path / 'o.npz'}"])
  err = capsys.readouterr().err
  assert rc == 2 and "missing keys" in err and "Conv2d_1a_3x3.conv.weight" in err
  assert "Traceback" not in err and not (tmp_path / "o.npz").exists()


def test_inception_features_rejects_a_foreign_npz(tmp_path):
  np.savez(tmp_path / "foreign.npz", **{"params/fc/kernel": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="does not hold FID Inception variables"):
    inception.InceptionFeatures(str(tmp_path / "foreign.npz"))


# -- The digits feature net. -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_extractor(tmp_path_factory):
  """Trains the net once (cache in a temporary folder) for this module."""
  return digits_features.DigitsFeatures(str(tmp_path_factory.mktemp("digits") / "net.npz"))


@pytest.fixture(scope="module")
def digits():
  return digits_features.load_digits_uint8()


def test_digits_images_match_the_dataset_scaling(digits):
  from sklearn.datasets import load_digits

  images, labels = digits
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
  raw = load_digits().images
  np.testing.assert_array_equal(images[..., 0], np.round(raw * 255 / 16).astype(np.uint8))
  assert images.max() == 255 and labels.shape == (1797,)


def test_digits_classifier_accuracy_and_cache(digits_extractor, digits):
  images, labels = digits
  features, logits = digits_extractor(images[1500:])
  assert features.shape == (297, 64) and logits.shape == (297, 10)
  accuracy = np.mean(np.argmax(logits, -1) == labels[1500:])
  assert accuracy > 0.95
  assert digits_extractor.held_out_accuracy == pytest.approx(accuracy)
  assert isinstance(digits_extractor, fid.FeatureExtractor) and digits_extractor.image_size == 8
  # A second instance loads the cache (no training) and computes the same features.
  reloaded = digits_features.DigitsFeatures(digits_extractor.cache_path)
  np.testing.assert_array_equal(reloaded(images[1500:])[0], features)
  # Larger or RGB inputs are brought to 8x8 gray.
  big = np.repeat(np.repeat(np.repeat(images[:5], 2, 1), 2, 2), 3, -1)
  assert reloaded(big)[0].shape == (5, 64)


def test_digits_training_is_deterministic(digits_extractor):
  params, accuracy = digits_features.train_digits_classifier(seed=0)
  assert accuracy == digits_extractor.held_out_accuracy
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(digits_extractor.params), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_digits_fid_separates_real_from_noise(digits_extractor, digits):
  images, _ = digits
  train_features, train_logits = digits_extractor(images[:1500])
  held_features, _ = digits_extractor(images[1500:])
  noise = np.random.default_rng(13).integers(0, 256, (297, 8, 8, 1), dtype=np.uint8)
  noise_features, noise_logits = digits_extractor(noise)
  fid_real = fid.fid_from_features(train_features, held_features)
  fid_noise = fid.fid_from_features(train_features, noise_features)
  assert fid_noise > 10 * fid_real
  is_real, _ = fid.inception_score(train_logits)
  is_noise, _ = fid.inception_score(noise_logits)
  assert is_real > 8 and is_real > 2 * is_noise


# -- Extra cross-checks against real PyTorch (skipped without torch). --------------------------


def test_torch_reads_our_files_and_we_read_torchs(tmp_path):
  torch = pytest.importorskip("torch")
  state_dict = _sample_state_dict()
  for legacy in (False, True):
    path = tmp_path / f"ours_{legacy}.pth"
    torch_pickle.save_state_dict(path, state_dict, legacy_format=legacy)
    loaded = torch.load(path, weights_only=True)
    for key, value in state_dict.items():
      np.testing.assert_array_equal(loaded[key].numpy(), value)
    assert (
      loaded["transposed"].untyped_storage().data_ptr()
      == loaded["base"].untyped_storage().data_ptr()
    )
    base = torch.arange(24.0).reshape(4, 6)
    theirs = {"a": base, "t": base.t(), "s": base[1:, ::2], "i": torch.tensor(7), "h": base.half()}
    path = tmp_path / f"theirs_{legacy}.pth"
    torch.save(theirs, path, _use_new_zipfile_serialization=not legacy)
    ours = torch_pickle.load_state_dict(path)
    for key, value in theirs.items():
      np.testing.assert_array_equal(ours[key], value.numpy())


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
