"""The original TF1 checkpoints (diffusion_tf): names, and reading their U-Net weights.

Our path `a/b/kernel` is `model/a/b/W` (bias `b`; GroupNorm scale/bias are `gamma`/`beta`); the
layouts are the same (conv [kh, kw, in, out]; dense and the 1x1 `nin` layers, q/k/v/proj_out/
nin_shortcut, [in, out]). The EMA copy `<name>/ExponentialMovingAverage` is taken when the
checkpoint has one; Adam slots and variables outside `model/` are ignored.
`ddpm_jax.models.unet` has the table of names.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import ml_collections
import numpy as np
from flax import traverse_util

from ddpm_jax.weights.matching import (
  ConversionError,
  Params,
  Shape,
  check,
  is_norm,
  one_line,
  unflatten,
)

EMA_SUFFIX = "/ExponentialMovingAverage"
_OPTIMIZER_SLOTS = ("/Adam", "/Adam_1")
_TF_LEAVES = {"kernel": "W", "bias": "b"}
_TF_NORM_LEAVES = {"scale": "gamma", "bias": "beta"}


def tf_name(path: str) -> str:
  """Our path -> the original TF variable: 'down_0/block_0/norm1/scale' -> 'model/down_0/
  block_0/norm1/gamma', 'conv_in/kernel' -> 'model/conv_in/W'."""
  *scopes, leaf = path.split("/")
  leaves = _TF_NORM_LEAVES if is_norm(scopes[-1]) else _TF_LEAVES
  return "/".join(["model", *scopes, leaves[leaf]])


def path_from_tf_name(name: str) -> str | None:
  """The inverse of `tf_name`; None for a name that is no U-Net variable."""
  parts = name.split("/")
  if len(parts) < 3 or parts[0] != "model":
    return None
  *scopes, leaf = parts[1:]
  leaves = _TF_NORM_LEAVES if is_norm(scopes[-1]) else _TF_LEAVES
  inverse = {v: k for k, v in leaves.items()}
  return "/".join([*scopes, inverse[leaf]]) if leaf in inverse else None


def to_tf_names(params: Params) -> dict[str, np.ndarray]:
  """Our params -> {original TF name: array}, the layout of the official checkpoints."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return {tf_name(path): np.asarray(value) for path, value in flat.items()}


def resolve_tf_checkpoint(path: str) -> str:
  """The checkpoint prefix of `path` (a prefix, or a directory with a `checkpoint` file)."""
  import tensorflow as tf

  if tf.io.gfile.isdir(path):
    prefix = tf.train.latest_checkpoint(path)
    if prefix is None:
      raise FileNotFoundError(
        f"No TF checkpoint in the directory {path}; pass --input=DIR/"
        "model.ckpt-<step> (the prefix of the .index and .data files)."
      )
    return prefix
  if not tf.io.gfile.exists(path + ".index"):
    raise FileNotFoundError(
      f"No TF checkpoint {path}: {path}.index does not exist. Pass the "
      "prefix of the .index and .data files, e.g. model.ckpt-790000."
    )
  return path


def tf_checkpoint_step(path: str) -> int:
  """The step in a TF checkpoint's name (model.ckpt-790000 -> 790000), else 0."""
  m = re.search(r"-(\d+)$", os.path.basename(path.rstrip("/")))
  return int(m.group(1)) if m else 0


def _tf_source(shapes: Mapping[str, Shape], use_ema: bool) -> tuple[dict[str, Shape], bool]:
  """The checkpoint's U-Net variables to read ({name: shape}) and whether they are EMA copies.

  EMA copies are taken when `use_ema` and the checkpoint has any; then the raw ones are ignored.
  Optimizer slots and names outside `model/` are always ignored.
  """
  model = {
    k: s for k, s in shapes.items() if k.startswith("model/") and not k.endswith(_OPTIMIZER_SLOTS)
  }
  ema = {k: s for k, s in model.items() if k.endswith(EMA_SUFFIX)}
  if use_ema and ema:
    return ema, True
  if use_ema:
    logging.warning("The checkpoint has no %s copies; importing the raw weights.", EMA_SUFFIX)
  return {k: s for k, s in model.items() if not k.endswith(EMA_SUFFIX)}, False


def from_tf_checkpoint(
  path: str, config: ml_collections.ConfigDict, *, use_ema: bool = True
) -> Params:
  """The params of an original TF1 checkpoint (e.g. `.../model.ckpt-790000`, or its directory).

  Args:
    path: the checkpoint prefix, or a directory with a `checkpoint` file.
    config: the config whose U-Net the weights must fit exactly.
    use_ema: take the `<name>/ExponentialMovingAverage` copies when the checkpoint has them (the
      weights the paper samples from); False takes the raw weights.
  Returns:
    The params tree of `factories.create_model(config)`, numpy arrays of its param dtype.
  Raises:
    FileNotFoundError: no such checkpoint.
    ConversionError: names or shapes do not fit the config (one message listing them all), or
      the checkpoint is corrupt (one line).
  """
  import tensorflow as tf

  prefix = resolve_tf_checkpoint(path)
  try:  # A corrupt index or data file: TF's own checks (sizes, CRCs) raise OpErrors.
    reader = tf.train.load_checkpoint(prefix)
    shapes = {k: tuple(s) for k, s in reader.get_variable_to_shape_map().items()}
    source, ema = _tf_source(shapes, use_ema)
    suffix = EMA_SUFFIX if ema else ""
    keys, expected = check(
      f"The TF checkpoint {prefix}",
      config,
      source,
      lambda k: path_from_tf_name(k[: len(k) - len(suffix)]),
      lambda p: tf_name(p) + suffix,
      lambda _, s: s,
      lambda _, s: s,
    )
    logging.info("Reading %d %s variables from %s", len(keys), "EMA" if ema else "raw", prefix)
    return unflatten(
      {p: np.asarray(reader.get_tensor(k)).astype(expected[p].dtype) for p, k in keys.items()}
    )
  except tf.errors.OpError as e:
    raise ConversionError(
      f"{prefix}: not a readable TF checkpoint ({type(e).__name__}: {one_line(e.message)})"
    ) from e
