"""The FID Inception-v3 in Flax: the 2015 TF graph used by TTUR's FID and OpenAI's IS.

The architecture is pytorch-fid's `fid_inception_v3()`: torchvision's Inception-v3 (no aux
logits, 1008 classes) with Mixed_5b..5d = FIDInceptionA and Mixed_6b..6e = FIDInceptionC (their
pool branch averages with count_include_pad=False, like TF), Mixed_7b = FIDInceptionE_1 (same)
and Mixed_7c = FIDInceptionE_2 (max pool in the pool branch, a quirk of the 2015 graph). Every
conv has no bias and is followed by inference-mode BatchNorm (eps 0.001) and ReLU.

Variable paths mirror pytorch-fid's state-dict keys, so `convert_inception` maps them 1:1:
  Conv2d_1a_3x3.conv.weight [out, in, kh, kw] -> params/Conv2d_1a_3x3/conv/kernel [kh, kw, in, out]
  <layer>.bn.weight / bias                    -> params/<layer>/bn/scale / bias
  <layer>.bn.running_mean / running_var       -> batch_stats/<layer>/bn/mean / var
  Mixed_5b.branch1x1.conv.weight              -> params/Mixed_5b/branch1x1/conv/kernel, etc.
  fc.weight [1008, 2048] / fc.bias            -> params/fc/kernel [2048, 1008] / bias

Input preprocessing matches pytorch-fid (its FID differs slightly from TTUR's TF code, whose
graph resizes with TF1's corner-aligned bilinear): images in [0, 255] are resized to 299x299 with
`jax.image.resize(..., "bilinear", antialias=False)`, which equals torch's
`F.interpolate(mode="bilinear", align_corners=False)` (half-pixel centres, no anti-aliasing, also
when shrinking), then mapped to [-1, 1] by x / 127.5 - 1 (pytorch-fid: 2 x - 1 on [0, 1]).
Grayscale images are repeated to RGB, as PIL's convert("RGB") does.

Logits: OpenAI's IS code takes pool_3 @ W of the graph's softmax layer *without* its bias, so
`InceptionFeatures` returns those "unbiased" logits by default (torch-fidelity does the same);
`logits="biased"` gives fc(pool) with the bias.
"""

import io
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax import file_io, parallel

IMAGE_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)

# Full float32 matmuls: TPU/GPU defaults (bf16 passes, TF32) would perturb FID.
_PRECISION = jax.lax.Precision.HIGHEST


class MissingWeightsError(FileNotFoundError):
  """The converted Inception weights (.npz) are not where the config says."""

  def __init__(self, path: str):
    super().__init__(
      f"FID / Inception Score need the converted Inception weights, but "
      f"eval.inception_weights={path!r} {'is not set' if not path else 'does not exist'}.\n"
      f"Get them once (no torch needed):\n"
      f"  1. Download {WEIGHTS_FILENAME} (pytorch-fid's GitHub release 'fid_weights'):\n"
      f"       {WEIGHTS_URL}\n"
      f"  2. python -m ddpm_jax.weights.convert_inception --input={WEIGHTS_FILENAME} "
      f"--output=inception_fid.npz\n"
      f"  3. Pass --config.eval.inception_weights=/path/to/inception_fid.npz"
    )
    self.path = path


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 0.001) -> ReLU; [N, H, W, C] -> [N, H', W', F]."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)  # Symmetric (rows, cols), as torch's Conv2d padding.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    (ph, pw) = self.padding
    x = nn.Conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=_PRECISION,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool, padding 1, not counting the padding (TF's behaviour)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
  """Mixed_5b..5d: 64 + 64 + 96 + pool_features channels."""

  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch1x1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    branch5x5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    branch5x5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision's InceptionB, unpatched): 384 + 96 + C_in channels, stride 2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = BasicConv2d(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    branch3x3dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b..6e: 4 x 192 channels with factorised 7x7 convs of width channels_7x7."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    branch1x1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    branch7x7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    branch7x7 = BasicConv2d(c7, **row, name="branch7x7_2")(branch7x7)
    branch7x7 = BasicConv2d(192, **col, name="branch7x7_3")(branch7x7)
    branch7x7dbl = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    branch7x7dbl = BasicConv2d(c7, **col, name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, **row, name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, **col, name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = BasicConv2d(192, **row, name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (torchvision's InceptionD, unpatched): 320 + 192 + C_in channels, stride 2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    branch3x3 = BasicConv2d(320, (3, 3), strides=(2, 2), name="branch3x3_2")(branch3x3)
    branch7x7x3 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (pool="avg", FIDInceptionE_1) and Mixed_7c (pool="max", FIDInceptionE_2): 2048 ch."""

  pool: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    branch1x1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    branch3x3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate(
      [
        BasicConv2d(384, **row, name="branch3x3_2a")(branch3x3),
        BasicConv2d(384, **col, name="branch3x3_2b")(branch3x3),
      ],
      axis=-1,
    )
    branch3x3dbl = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate(
      [
        BasicConv2d(384, **row, name="branch3x3dbl_3a")(branch3x3dbl),
        BasicConv2d(384, **col, name="branch3x3dbl_3b")(branch3x3dbl),
      ],
      axis=-1,
    )
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    else:  # The 2015 graph's quirk: max pooling in Mixed_7c (pytorch-fid's FIDInceptionE_2).
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    branch_pool = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
  """[N, 299, 299, 3] in [-1, 1] -> (pool features [N, 2048], logits [N, 1008] = fc(pool))."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # 149
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)  # 73
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
    x = _max_pool_3x3_stride2(x)  # 35
    x = FIDInceptionA(32, name="Mixed_5b")(x)  # 256
    x = FIDInceptionA(64, name="Mixed_5c")(x)  # 288
    x = FIDInceptionA(64, name="Mixed_5d")(x)  # 288
    x = InceptionB(name="Mixed_6a")(x)  # 17x17x768
    x = FIDInceptionC(128, name="Mixed_6b")(x)
    x = FIDInceptionC(160, name="Mixed_6c")(x)
    x = FIDInceptionC(160, name="Mixed_6d")(x)
    x = FIDInceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)  # 8x8x1280
    x = FIDInceptionE("avg", name="Mixed_7b")(x)  # 2048
    x = FIDInceptionE("max", name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))  # Global average pool (pool_3).
    logits = nn.Dense(NUM_CLASSES, precision=_PRECISION, name="fc")(pool)  # Dropout: inference.
    return pool, logits


def preprocess(images: jax.Array) -> jax.Array:
  """Images [N, H, W, C in {1, 3}] in [0, 255] -> float32 [N, 299, 299, 3] in [-1, 1]."""
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
    shape = (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3)
    x = jax.image.resize(x, shape, method="bilinear", antialias=False)
  return x / 127.5 - 1.0


def variable_shapes() -> dict[str, tuple[int, ...]]:
  """{'params/Conv2d_1a_3x3/conv/kernel': (3, 3, 3, 32), ...} of FIDInceptionV3, via eval_shape."""
  shapes = jax.eval_shape(
    FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
  )
  flat = traverse_util.flatten_dict(shapes, sep="/")
  return {key: tuple(value.shape) for key, value in flat.items()}


def load_variables(path: str) -> dict[str, Any]:
  """The converted .npz at `path` -> {'params': ..., 'batch_stats': ...} (numpy float32).

  Raises MissingWeightsError if the file is absent, ValueError if it does not fit the model.
  """
  if not path or not file_io.exists(path):
    raise MissingWeightsError(path)
  with np.load(io.BytesIO(file_io.read_bytes(path))) as npz:
    flat = {key: np.asarray(npz[key], np.float32) for key in npz.files}
  expected = variable_shapes()
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  misshaped = [
    f"{k}: {flat[k].shape} != {expected[k]}"
    for k in sorted(set(flat) & set(expected))
    if flat[k].shape != expected[k]
  ]
  if missing or unexpected or misshaped:
    raise ValueError(
      f"{path} does not hold FID Inception variables (convert pytorch-fid's {WEIGHTS_FILENAME} "
      f"with ddpm_jax.weights.convert_inception). Missing: {missing[:10]}; unexpected: "
      f"{unexpected[:10]}; mis-shaped: {misshaped[:10]}."
    )
  return traverse_util.unflatten_dict(flat, sep="/")


@jax.jit
def _features(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """uint8 [B, H, W, C] -> (pool [B, 2048], fc(pool) [B, 1008], pool @ W [B, 1008])."""
  pool, logits = FIDInceptionV3().apply(variables, preprocess(images))
  unbiased = jnp.matmul(pool, variables["params"]["fc"]["kernel"], precision=_PRECISION)
  return pool, logits, unbiased


class InceptionFeatures:
  """FeatureExtractor with the FID Inception: uint8 [N, H, W, C] -> (pool [N, 2048], logits).

  `weights_path` is the .npz made by `convert_inception` (config field eval.inception_weights).
  Images go through one jitted forward per `batch_size` chunk (the last is padded, so only one
  shape compiles). logits [N, 1008] are pool @ W without bias by default (OpenAI's IS), or
  fc(pool) with `logits="biased"`.
  """

  image_size = IMAGE_SIZE

  def __init__(self, weights_path: str, batch_size: int = 200, logits: str = "unbiased"):
    if logits not in ("unbiased", "biased"):
      raise ValueError(f"logits must be 'unbiased' or 'biased', not {logits!r}.")
    self.variables = jax.device_put(load_variables(weights_path))
    self.batch_size = batch_size
    self._biased_logits = logits == "biased"

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (or [0, 255] float) [N, H, W, C] -> (pool [N, 2048], logits [N, 1008]) float32."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"Expected images [N, H, W, 1 or 3]; got {images.shape}.")
    num = images.shape[0]
    batch = min(self.batch_size, max(num, 1))
    features = parallel.pad_unpad(lambda chunk: _features(self.variables, chunk), batch)
    pools, logits = [], []
    for start in range(0, num, batch):
      pool, biased, unbiased = features(images[start : start + batch])
      pools.append(np.asarray(pool))
      logits.append(np.asarray(biased if self._biased_logits else unbiased))
    if not pools:
      return np.zeros((0, POOL_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(pools), np.concatenate(logits)
