"""A small CNN classifier of the embedded 8x8 digits, the feature net for their FID and IS.

Inception features mean nothing on 8x8 grayscale digits, so the `digits` dataset gets its own
extractor: a 3-conv + 2-dense Flax net trained once on the first 1,500 digits (the pipeline's
train split), deterministically from a seed, in about 10 seconds on 2 CPU cores (mostly
compilation); held-out accuracy on the other 297 is 97-98%. Its 64-d penultimate layer plays
Inception's pool_3 (FID) and its 10 logits the softmax (IS). The trained variables are cached in
an .npz (default `~/.cache/ddpm_jax/digits_features_v1.npz`) so later runs only load them.
"""

import functools
import io
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ddpm_jax import file_io
from ddpm_jax.data.digits import IMAGE_SIZE, NUM_CLASSES, NUM_TRAIN, load_digits_uint8

FEATURE_DIM = 64
CACHE_VERSION = 1
DEFAULT_CACHE_PATH = os.path.join(
  "~", ".cache", "ddpm_jax", f"digits_features_v{CACHE_VERSION}.npz"
)


class Conv3x3(nn.Module):
  """3x3 conv, padding 1, as im2col + matmul: [N, H, W, C] -> [N, H / stride, W / stride, F].

  Same maths as nn.Conv (kernel [3, 3, C, F]); written as a matmul because XLA:CPU's conv
  gradients on such tiny maps are about 10x slower, and training should take seconds.
  """

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    s = self.stride
    patches = jnp.concatenate(
      [padded[:, i : i + height : s, j : j + width : s] for i in range(3) for j in range(3)], -1
    )
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return patches @ kernel.reshape(9 * channels, self.features) + bias


class DigitsNet(nn.Module):
  """[N, 8, 8, 1] in [-1, 1] -> (features [N, 64], logits [N, 10])."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = nn.relu(Conv3x3(32, name="conv1")(x))  # 8x8
    x = nn.relu(Conv3x3(64, stride=2, name="conv2")(x))  # 4x4
    x = nn.relu(Conv3x3(64, stride=2, name="conv3")(x))  # 2x2
    features = nn.relu(nn.Dense(FEATURE_DIM, name="dense1")(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(NUM_CLASSES, name="logits")(features)


def preprocess(images: jax.Array) -> jax.Array:
  """Images [N, H, W, 1 or 3] in [0, 255] -> float32 [N, 8, 8, 1] in [-1, 1].

  RGB is averaged to gray; other sizes are resized to 8x8 (bilinear, antialiased, like the
  input pipeline's resize).
  """
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 3:
    x = jnp.mean(x, axis=-1, keepdims=True)
  if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
    shape = (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1)
    x = jax.image.resize(x, shape, method="bilinear", antialias=True)
  return x / 127.5 - 1.0


def _augment(key: jax.Array, x: jax.Array) -> jax.Array:
  """Random shifts by up to one pixel (zero = background padding), [B, 8, 8, 1]."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key, (x.shape[0], 2), 0, 3)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (IMAGE_SIZE, IMAGE_SIZE, 1))

  return jax.vmap(crop)(padded, offsets)


@functools.partial(jax.jit, static_argnames=("num_epochs", "batch_size"))
def _train(key: jax.Array, images: jax.Array, labels: jax.Array, num_epochs: int, batch_size: int):
  """AdamW with cosine decay over `num_epochs` shuffled epochs, all in one compiled loop."""
  model = DigitsNet()
  init_key, key = jax.random.split(key)
  params = model.init(init_key, images[:1])["params"]
  steps_per_epoch = images.shape[0] // batch_size
  schedule = optax.cosine_decay_schedule(3e-3, num_epochs * steps_per_epoch)
  optimizer = optax.adamw(schedule, weight_decay=1e-4)

  def loss_fn(params, x, y):
    _, logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, batch):
    params, opt_state = carry
    x, y, aug_key = batch
    grads = jax.grad(loss_fn)(params, _augment(aug_key, x), y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  def epoch(carry, epoch_key):
    perm_key, aug_key = jax.random.split(epoch_key)
    order = jax.random.permutation(perm_key, images.shape[0])[: steps_per_epoch * batch_size]
    xs = images[order].reshape(steps_per_epoch, batch_size, *images.shape[1:])
    ys = labels[order].reshape(steps_per_epoch, batch_size)
    return jax.lax.scan(step, carry, (xs, ys, jax.random.split(aug_key, steps_per_epoch)))[0], None

  carry = (params, optimizer.init(params))
  (params, _), _ = jax.lax.scan(epoch, carry, jax.random.split(key, num_epochs))
  return params


@jax.jit
def _apply(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  return DigitsNet().apply({"params": params}, preprocess(images))


def train_digits_classifier(
  seed: int = 0, num_epochs: int = 60, batch_size: int = 50
) -> tuple[Any, float]:
  """Trains DigitsNet on the first 1,500 digits -> (params, accuracy on the other 297)."""
  images, labels = load_digits_uint8()
  labels = labels.astype(np.int32)
  x = preprocess(images[:NUM_TRAIN])
  params = _train(jax.random.key(seed), x, jnp.asarray(labels[:NUM_TRAIN]), num_epochs, batch_size)
  params = jax.tree.map(np.asarray, params)
  _, logits = _apply(params, images[NUM_TRAIN:])
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels[NUM_TRAIN:]))
  return params, accuracy


def _save(path: str, params: Any, accuracy: float) -> None:
  flat = traverse_util.flatten_dict(params, sep="/")
  buffer = io.BytesIO()
  np.savez(
    buffer, held_out_accuracy=np.float64(accuracy), **{f"params/{k}": v for k, v in flat.items()}
  )
  file_io.write_atomically(path, buffer.getvalue())


def _load(path: str) -> tuple[Any, float]:
  with np.load(io.BytesIO(file_io.read_bytes(path))) as npz:
    if "held_out_accuracy" not in npz.files:
      raise ValueError(f"{path} does not hold DigitsNet weights; delete it to retrain.")
    flat = {k[len("params/") :]: npz[k] for k in npz.files if k.startswith("params/")}
    accuracy = float(npz["held_out_accuracy"])
  params = traverse_util.unflatten_dict(flat, sep="/")
  expected = jax.eval_shape(DigitsNet().init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  if jax.tree.structure(expected) != jax.tree.structure(params) or any(
    a.shape != b.shape
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params), strict=True)
  ):
    raise ValueError(f"{path} does not hold DigitsNet weights; delete it to retrain.")
  return params, accuracy


class DigitsFeatures:
  """FeatureExtractor for 8x8 digits: uint8 [N, H, W, C] -> (features [N, 64], logits [N, 10]).

  Loads the trained net from `cache_path` (default ~/.cache/ddpm_jax/digits_features_v1.npz),
  training and caching it first if the file does not exist.
  """

  image_size = IMAGE_SIZE

  def __init__(self, cache_path: str | None = None, seed: int = 0):
    path = os.path.expanduser(cache_path or DEFAULT_CACHE_PATH)
    if file_io.exists(path):
      params, accuracy = _load(path)
    else:
      params, accuracy = train_digits_classifier(seed)
      _save(path, params, accuracy)
    self.params = jax.device_put(params)
    self.held_out_accuracy = accuracy
    self.cache_path = path

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 1 or 3] -> (features float32 [N, 64], logits float32 [N, 10])."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"Expected images [N, H, W, 1 or 3]; got {images.shape}.")
    features, logits = _apply(self.params, images)
    return np.asarray(features), np.asarray(logits)
