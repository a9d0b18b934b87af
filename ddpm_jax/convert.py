"""Imports the official DDPM weights (TF1 checkpoints or diffusers' UNet2DModel) as a checkpoint.

  python -m ddpm_jax.convert --source=tf --input=diffusion_cifar10_model/model.ckpt-790000 \
      --config=configs/cifar10.py --workdir=/tmp/ddpm_cifar10_official
  python -m ddpm_jax.convert --source=diffusers --input=ddpm-cifar10-32/ \
      --config=configs/cifar10.py --workdir=/tmp/ddpm_cifar10_diffusers
  python -m ddpm_jax.main --mode=sample --config=configs/cifar10.py \
      --workdir=/tmp/ddpm_cifar10_official

The result is `<workdir>/checkpoints/<step>`, a full `TrainState` whose `params` and `ema_params`
are both the imported weights (fresh optimizer state), so `--mode=sample|eval|figures` use it as
is and `--mode=train` fine-tunes from it. The step is the TF checkpoint's (model.ckpt-790000 ->
790000), else 0, or `--step` (>= 0); an existing checkpoint of that step is never overwritten.

Weight files come from the internet: a .safetensors file is read by the `safetensors` package
(which validates its header, offsets and overlaps), a .bin file by `torch_pickle` (no pickle
runs code); names, shapes and dtypes are checked against the config's U-Net before any tensor is
read, and only its tensors are read. A malformed file ends in one ConversionError naming it.

Names (spec section 6; `ddpm_jax.models.unet` has the table). TF: our path `a/b/kernel` is
`model/a/b/W` (bias `b`; GroupNorm scale/bias are `gamma`/`beta`); layouts are the same (conv
[kh, kw, in, out]; dense and the 1x1 `nin` layers, q/k/v/proj_out/nin_shortcut, [in, out]). The
EMA copy `<name>/ExponentialMovingAverage` is taken when the checkpoint has one; Adam slots and
variables outside `model/` are ignored. diffusers (`UNet2DModel`, PyTorch layouts):
  temb/dense{0,1}             time_embedding.linear_{1,2}       Linear [out, in]
  conv_in, norm_out, conv_out conv_in, conv_norm_out, conv_out  Conv2d [out, in, kh, kw]
  down_i/block_j/{norm1, conv1, temb_proj, norm2, conv2, nin_shortcut}
                              down_blocks.i.resnets.j.{norm1, conv1, time_emb_proj, norm2, conv2,
                              conv_shortcut}                    conv_shortcut is a 1x1 Conv2d
  down_i/attn_j/{norm, q, k, v, proj_out}
                              down_blocks.i.attentions.j.{group_norm, to_q, to_k, to_v, to_out.0}
                              (older diffusers: query, key, value, proj_attn)  Linear [out, in]
  down_i/downsample/conv      down_blocks.i.downsamplers.0.conv
  mid/{block_1, attn_1, block_2}  mid_block.{resnets.0, attentions.0, resnets.1}
  up_i/{block_j, attn_j}      up_blocks.{L-1-i}.{resnets.j, attentions.j}  (diffusers counts the
  up_i/upsample/conv          up_blocks.{L-1-i}.upsamplers.0.conv           up path from the bottom)
GroupNorm weight/bias -> scale/bias. diffusers pads the stride-2 downsample conv by (0, 1, 0, 1)
with `downsample_padding=0`, and its `Timesteps(flip_sin_to_cos=False, freq_shift=1)` is our
[sin, cos] embedding: both equal the original's (tests/test_convert.py checks the outputs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pkgutil
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes  # safetensors' numpy path returns BF16 only once ml_dtypes is imported.
import numpy as np
import safetensors
from flax import traverse_util

from ddpm_jax import checkpointing, factories, file_io
from ddpm_jax import train_state as train_state_lib
from ddpm_jax.metrics import torch_pickle

Params = dict[str, Any]
Shape = tuple[int, ...]

EMA_SUFFIX = "/ExponentialMovingAverage"
_OPTIMIZER_SLOTS = ("/Adam", "/Adam_1")
_TF_LEAVES = {"kernel": "W", "bias": "b"}
_TF_NORM_LEAVES = {"scale": "gamma", "bias": "beta"}
_DIFFUSERS_FILENAME = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_BIN_FILENAME = "diffusion_pytorch_model.bin"
_DIFFUSERS_TOP = {
  "temb/dense0": "time_embedding.linear_1", "temb/dense1": "time_embedding.linear_2",
  "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
_DIFFUSERS_RESNET = {
  "norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
  "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
# Attention key styles: diffusers >= 0.15 `Attention` ("new") and the older `AttentionBlock`.
DIFFUSERS_ATTENTION = {
  "new": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
  "old": {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"},
}
_MAX_LISTED = 10
# The safetensors dtypes its numpy path returns -> numpy (others, e.g. F8, numpy cannot hold).
_SAFETENSORS_DTYPES = {name: np.dtype(dtype) for name, dtype in {
  "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
  "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
  "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_, "C64": np.complex64,
}.items()}
_FLOAT_DTYPES = frozenset(_SAFETENSORS_DTYPES[name] for name in ("F64", "F32", "F16", "BF16"))


class ConversionError(ValueError):
  """The weights' names or shapes do not fit the config's U-Net (or cannot be read)."""


# -- Our parameters. ----------------------------------------------------------------------------


def variable_shapes(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The U-Net's parameters of `config`, path ('down_0/block_0/conv1/kernel') -> shape and dtype,
  by `jax.eval_shape` (nothing is computed). CIFAR-10: 328 variables."""
  model = factories.create_model(config)
  size, channels = config.data.image_size, config.data.num_channels
  x = jnp.zeros((1, size, size, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, train=False))
  return traverse_util.flatten_dict(abstract["params"], sep="/")


def _unflatten(flat: Mapping[str, np.ndarray]) -> Params:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def _is_norm(layer: str) -> bool:
  """GroupNorm layers are the only ones named norm, norm1, norm2, norm_out."""
  return layer.startswith("norm")


# -- TF names. ----------------------------------------------------------------------------------


def tf_name(path: str) -> str:
  """Our path -> the original TF variable: 'down_0/block_0/norm1/scale' -> 'model/down_0/
  block_0/norm1/gamma', 'conv_in/kernel' -> 'model/conv_in/W'."""
  *scopes, leaf = path.split("/")
  leaves = _TF_NORM_LEAVES if _is_norm(scopes[-1]) else _TF_LEAVES
  return "/".join(["model", *scopes, leaves[leaf]])


def path_from_tf_name(name: str) -> str | None:
  """The inverse of `tf_name`; None for a name that is no U-Net variable."""
  parts = name.split("/")
  if len(parts) < 3 or parts[0] != "model":
    return None
  *scopes, leaf = parts[1:]
  leaves = _TF_NORM_LEAVES if _is_norm(scopes[-1]) else _TF_LEAVES
  inverse = {v: k for k, v in leaves.items()}
  return "/".join([*scopes, inverse[leaf]]) if leaf in inverse else None


def to_tf_names(params: Params) -> dict[str, np.ndarray]:
  """Our params -> {original TF name: array}, the layout of the official checkpoints."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return {tf_name(path): np.asarray(value) for path, value in flat.items()}


# -- diffusers names. ---------------------------------------------------------------------------


def diffusers_key(path: str, num_levels: int, attention: str = "new") -> str:
  """Our path -> the diffusers UNet2DModel key: 'up_3/block_0/nin_shortcut/kernel' with 4 levels
  -> 'up_blocks.0.resnets.0.conv_shortcut.weight'. `attention`: 'new' or 'old' key style."""
  module, leaf = path.rsplit("/", 1)
  suffix = "bias" if leaf == "bias" else "weight"
  if module in _DIFFUSERS_TOP:
    return f"{_DIFFUSERS_TOP[module]}.{suffix}"
  scope, child, layer = module.split("/")
  if scope == "mid":
    prefix, offset = "mid_block", 1  # mid/block_1 -> mid_block.resnets.0
  else:
    direction, level = scope.split("_")
    block = int(level) if direction == "down" else num_levels - 1 - int(level)
    prefix, offset = f"{direction}_blocks.{block}", 0
  if child in ("downsample", "upsample"):
    return f"{prefix}.{child}rs.0.conv.{suffix}"
  kind, index = child.split("_")
  if kind == "block":
    return f"{prefix}.resnets.{int(index) - offset}.{_DIFFUSERS_RESNET[layer]}.{suffix}"
  layer = DIFFUSERS_ATTENTION[attention][layer]
  return f"{prefix}.attentions.{int(index) - offset}.{layer}.{suffix}"


_BLOCK_KEY = re.compile(
  r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)\.(weight|bias)")
_MID_KEY = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)\.(weight|bias)")
_RESAMPLE_KEY = re.compile(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(weight|bias)")


def path_from_diffusers_key(key: str, num_levels: int, attention: str = "new") -> str | None:
  """The inverse of `diffusers_key`; None for a key that is no U-Net variable."""
  layers = {"resnets": _DIFFUSERS_RESNET, "attentions": DIFFUSERS_ATTENTION[attention]}
  if m := _BLOCK_KEY.fullmatch(key):
    direction, block, kind, index, layer, suffix = m.groups()
    level = int(block) if direction == "down" else num_levels - 1 - int(block)
    module = f"{direction}_{level}/{'block' if kind == 'resnets' else 'attn'}_{index}"
  elif m := _MID_KEY.fullmatch(key):
    kind, index, layer, suffix = m.groups()
    module = f"mid/{'block' if kind == 'resnets' else 'attn'}_{int(index) + 1}"
  elif m := _RESAMPLE_KEY.fullmatch(key):
    direction, block, resample, suffix = m.groups()
    if direction != resample:
      return None
    level = int(block) if direction == "down" else num_levels - 1 - int(block)
    return f"{direction}_{level}/{direction}sample/conv/{'bias' if suffix == 'bias' else 'kernel'}"
  else:
    top = {v: k for k, v in _DIFFUSERS_TOP.items()}
    module, _, suffix = key.rpartition(".")
    if module not in top:
      return None
    return f"{top[module]}/{suffix if suffix == 'bias' else _weight_leaf(top[module])}"
  names = {v: k for k, v in layers[kind].items()}
  if layer not in names:
    return None
  module = f"{module}/{names[layer]}"
  return f"{module}/{suffix if suffix == 'bias' else _weight_leaf(module)}"


def _weight_leaf(module: str) -> str:
  return "scale" if _is_norm(module.split("/")[-1]) else "kernel"


def torch_shape(path: str, shape: Shape) -> Shape:
  """Our shape -> the PyTorch layout: conv HWIO -> OIHW, dense [in, out] -> [out, in], and the
  ResBlock shortcut (our dense) -> a 1x1 conv [out, in, 1, 1]."""
  if not path.endswith("/kernel"):
    return shape
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return (shape[1], shape[0], 1, 1) if "/nin_shortcut/" in path else (shape[1], shape[0])


def shape_from_torch(path: str, shape: Shape) -> Shape:
  """The inverse of `torch_shape` (a 4-D shortcut becomes [in, out])."""
  if not path.endswith("/kernel"):
    return shape
  if len(shape) == 4:
    return (shape[1], shape[0]) if "/nin_shortcut/" in path else (*shape[2:], shape[1], shape[0])
  return shape[::-1]


def from_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  """A PyTorch tensor (numpy) -> our layout; the inverse of `torch_shape`."""
  if not path.endswith("/kernel"):
    return value
  if value.ndim == 4 and "/nin_shortcut/" in path:
    return value[:, :, 0, 0].T
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def to_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  """Our array -> the PyTorch layout (see `torch_shape`)."""
  if not path.endswith("/kernel"):
    return value
  if "/nin_shortcut/" in path:
    return value.T[:, :, None, None]
  return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T


def to_diffusers_state_dict(params: Params, attention: str = "new") -> dict[str, np.ndarray]:
  """Our params -> a diffusers UNet2DModel state dict (numpy, PyTorch layouts)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  num_levels = len({p.split("/")[0] for p in flat if p.startswith("down_")})
  return {
    diffusers_key(path, num_levels, attention): np.ascontiguousarray(
      to_torch_layout(path, np.asarray(value)))
    for path, value in flat.items()
  }


def diffusers_attention_style(keys: Any) -> str:
  """'old' when the state dict uses the older query/key/value/proj_attn names, else 'new'."""
  old = re.compile(r".*\.attentions\.\d+\.(query|key|value|proj_attn)\.(weight|bias)")
  return "old" if any(old.fullmatch(k) for k in keys) else "new"


# -- Matching a checkpoint to the config. -------------------------------------------------------


def _listing(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"  {title} ({len(items)}):\n" + "".join(f"    {s}\n" for s in shown).rstrip() + more


def _match(
  source_shapes: Mapping[str, Shape],
  path_of: Callable[[str], str | None],
  expected: Mapping[str, jax.ShapeDtypeStruct],
  source_key: Callable[[str], str],
  source_shape: Callable[[str, Shape], Shape],
) -> tuple[dict[str, str], list[str]]:
  """Pairs each expected path with a source key: ({path: source key}, the problems listed by
  source key, empty when everything fits)."""
  keys: dict[str, str] = {}
  unexpected, mis_shaped = [], []
  for key in sorted(source_shapes):
    path = path_of(key)
    if path is None or path not in expected or path in keys:
      unexpected.append(key)
      continue
    keys[path] = key
    want = source_shape(path, tuple(expected[path].shape))
    if tuple(source_shapes[key]) != want:
      mis_shaped.append(f"{key}: {tuple(source_shapes[key])}, expected {want}")
  missing = [source_key(p) for p in sorted(expected) if p not in keys]
  problems = []
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("mis-shaped", mis_shaped)):
    if items:
      problems.append(_listing(title, items))
  return keys, problems


def _architecture(shapes: Mapping[str, Shape]) -> dict[str, Any] | None:
  """The U-Net fields that our-layout variable shapes imply, or None when they are too broken."""
  try:
    ch = shapes["conv_in/kernel"][3]
    levels = sorted({int(p.split("/")[0][5:]) for p in shapes if p.startswith("down_")})
    return {
      "ch": ch,
      "ch_mult": tuple(shapes[f"down_{i}/block_0/conv1/kernel"][3] // ch for i in levels),
      "num_res_blocks": len({p.split("/")[1] for p in shapes if p.startswith("down_0/block_")}),
      "attn_levels": tuple(i for i in levels if f"down_{i}/attn_0/q/kernel" in shapes),
      "num_channels": shapes["conv_in/kernel"][2],
      "out_ch": shapes["conv_out/kernel"][3],
    }
  except (KeyError, IndexError, ValueError):
    return None


def _config_architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
  m, size = config.model, config.data.image_size
  return {
    "ch": m.ch, "ch_mult": tuple(m.ch_mult), "num_res_blocks": m.num_res_blocks,
    "attn_levels": tuple(i for i in range(len(m.ch_mult)) if size >> i in m.attn_resolutions),
    "num_channels": config.data.num_channels, "out_ch": factories.model_out_channels(config),
  }


def _overrides(arch: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """The --config flags that make `config`'s U-Net the architecture `arch`."""
  have = _config_architecture(config)
  flags = []
  for field in ("ch", "ch_mult", "num_res_blocks", "num_channels", "out_ch", "attn_levels"):
    if arch[field] == have[field]:
      continue
    if field == "attn_levels":
      value = tuple(config.data.image_size >> i for i in arch[field])
      flags.append(f"--config.model.attn_resolutions='{value}'")
    elif field == "num_channels":
      flags.append(f"--config.data.num_channels={arch[field]}")
    else:
      value = f"'{arch[field]}'" if isinstance(arch[field], tuple) else arch[field]
      flags.append(f"--config.model.{field}={value}")
  return flags


def suggest_config(arch: Mapping[str, Any]) -> str:
  """The configs/*.py files (with --config overrides if needed) whose U-Net is `arch`: those
  needing the fewest overrides (the 256x256 models share one architecture)."""
  import configs

  candidates: dict[str, list[str]] = {}
  for module in pkgutil.iter_modules(configs.__path__):
    if module.name in ("default", "__init__"):
      continue
    try:
      config = __import__(f"configs.{module.name}", fromlist=["get_config"]).get_config()
      candidates[module.name] = _overrides(arch, config)
    except Exception:  # noqa: BLE001 - a broken config file must not hide the real error.
      continue
  if not candidates:
    return "a config with the fields above"
  fewest = min(len(flags) for flags in candidates.values())
  return " or ".join(" ".join([f"--config=configs/{name}.py", *flags])
                     for name, flags in sorted(candidates.items()) if len(flags) == fewest)


def _describe(arch: Mapping[str, Any]) -> str:
  return (f"ch={arch['ch']}, ch_mult={arch['ch_mult']}, num_res_blocks={arch['num_res_blocks']}, "
          f"attention at level(s) {arch['attn_levels']}, {arch['num_channels']} input and "
          f"{arch['out_ch']} output channels")


def _conversion_error(
  what: str, problems: list[str], config: ml_collections.ConfigDict, found: Mapping[str, Shape]
) -> ConversionError:
  """One message: what does not fit, the architecture found, and the config to use."""
  lines = [f"{what} does not fit the U-Net of the config ({_describe(_config_architecture(config))}"
           f", image size {config.data.image_size}):", *problems]
  arch = _architecture(found)
  if arch is not None:
    lines.append(f"The weights hold a U-Net with {_describe(arch)}; convert them with "
                 f"{suggest_config(arch)}.")
  else:
    lines.append("Use the config the weights were trained with (e.g. configs/cifar10.py for "
                 "CIFAR-10, configs/lsun_church.py for the 256x256 models).")
  return ConversionError("\n".join(lines))


def _check(
  what: str, config: ml_collections.ConfigDict, source_shapes: Mapping[str, Shape],
  path_of: Callable[[str], str | None], source_key: Callable[[str], str],
  source_shape: Callable[[str, Shape], Shape], our_shape: Callable[[str, Shape], Shape],
) -> tuple[dict[str, str], dict[str, jax.ShapeDtypeStruct]]:
  """({path: source key}, expected variables); raises one ConversionError if anything differs."""
  expected = variable_shapes(config)
  keys, problems = _match(source_shapes, path_of, expected, source_key, source_shape)
  if problems:
    found = {}
    for key, shape in source_shapes.items():
      path = path_of(key)
      if path is not None:
        found[path] = our_shape(path, tuple(shape))
    raise _conversion_error(what, problems, config, found)
  return keys, expected


# -- TF checkpoints. ----------------------------------------------------------------------------


def resolve_tf_checkpoint(path: str) -> str:
  """The checkpoint prefix of `path` (a prefix, or a directory with a `checkpoint` file)."""
  import tensorflow as tf

  if tf.io.gfile.isdir(path):
    prefix = tf.train.latest_checkpoint(path)
    if prefix is None:
      raise FileNotFoundError(f"No TF checkpoint in the directory {path}; pass --input=DIR/"
                              "model.ckpt-<step> (the prefix of the .index and .data files).")
    return prefix
  if not tf.io.gfile.exists(path + ".index"):
    raise FileNotFoundError(f"No TF checkpoint {path}: {path}.index does not exist. Pass the "
                            "prefix of the .index and .data files, e.g. model.ckpt-790000.")
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
  model = {k: s for k, s in shapes.items()
           if k.startswith("model/") and not k.endswith(_OPTIMIZER_SLOTS)}
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
    keys, expected = _check(
      f"The TF checkpoint {prefix}", config, source,
      lambda k: path_from_tf_name(k[:len(k) - len(suffix)]),
      lambda p: tf_name(p) + suffix, lambda _, s: s, lambda _, s: s)
    logging.info("Reading %d %s variables from %s", len(keys), "EMA" if ema else "raw", prefix)
    return _unflatten({
      p: np.asarray(reader.get_tensor(k)).astype(expected[p].dtype) for p, k in keys.items()})
  except tf.errors.OpError as e:
    raise ConversionError(
      f"{prefix}: not a readable TF checkpoint ({type(e).__name__}: {_one_line(e.message)})"
    ) from e


# -- diffusers. ---------------------------------------------------------------------------------


_FROM_BIN = (
  "Download diffusion_pytorch_model.safetensors (or .bin) from the model's page, e.g. "
  "google/ddpm-cifar10-32.")


def diffusers_weights_file(path: str) -> str:
  """`path` itself, or the weights file of a model directory (`<path>` or `<path>/unet`):
  diffusion_pytorch_model.safetensors, else the older diffusion_pytorch_model.bin."""
  if not os.path.isdir(path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"No such file or directory: {path}")
    if not path.endswith((".safetensors", ".bin")):
      raise ConversionError(f"{path} is not a .safetensors or .bin file. {_FROM_BIN}")
    return path
  for folder in (path, os.path.join(path, "unet")):
    for name in (_DIFFUSERS_FILENAME, _DIFFUSERS_BIN_FILENAME):
      if os.path.exists(os.path.join(folder, name)):
        return os.path.join(folder, name)
  raise FileNotFoundError(f"No {_DIFFUSERS_FILENAME} in {path} (or {path}/unet). {_FROM_BIN}")


def _one_line(text: str, limit: int = 400) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _reading(filename: str) -> Iterator[None]:
  """Any failure to read the weights file `filename` becomes one ConversionError naming it."""
  try:
    yield
  except ConversionError:
    raise
  except torch_pickle.TorchFileError as e:  # Names the file already.
    raise ConversionError(str(e)) from e
  except (safetensors.SafetensorError, OSError, ValueError, TypeError, AttributeError,
          OverflowError, MemoryError) as e:
    raise ConversionError(
      f"{filename}: not a readable weights file ({type(e).__name__}: {_one_line(e)})") from e


def weights_header(filename: str) -> dict[str, torch_pickle.TensorSpec]:
  """Name -> (shape, numpy dtype) of the tensors of a .safetensors or torch .bin file, from its
  header (or pickle) alone: no tensor is read. Raises ConversionError (one line) when malformed."""
  with _reading(filename):
    if filename.endswith(".bin"):
      return torch_pickle.read_header(filename)
    specs = {}
    with safetensors.safe_open(filename, framework="numpy") as f:
      names = f.keys()
      for name in names:
        view = f.get_slice(name)
        if view.get_dtype() not in _SAFETENSORS_DTYPES:
          raise ConversionError(f"{filename}: tensor {name!r} has dtype {view.get_dtype()}, "
                                f"which numpy cannot hold.")
        specs[name] = torch_pickle.TensorSpec(
          tuple(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()])
    return specs


def read_weights(filename: str, expected: Mapping[str, Shape] | None = None
                 ) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors or torch .bin file that `expected` (name -> shape) names, each
  checked to be there with its shape before any is read; only they are read. None: all of them
  (a .bin's arrays then take at most 4x the file's size + 64 MiB). Raises ConversionError."""
  with _reading(filename):
    if filename.endswith(".bin"):
      if expected is None:
        return torch_pickle.load_state_dict(filename)
      return torch_pickle.load_state_dict(
        filename, {name: (tuple(shape), None) for name, shape in expected.items()})
    with safetensors.safe_open(filename, framework="numpy") as f:
      names = f.keys()
      if expected is None:
        expected = {name: tuple(f.get_slice(name).get_shape()) for name in names}
      names = set(names)
      for name, shape in expected.items():
        if name not in names:
          raise ConversionError(f"{filename}: no tensor {name!r}.")
        view = f.get_slice(name)
        if tuple(view.get_shape()) != tuple(shape):
          raise ConversionError(f"{filename}: tensor {name!r} has shape "
                                f"{tuple(view.get_shape())}, expected {tuple(shape)}.")
        if view.get_dtype() not in _SAFETENSORS_DTYPES:
          raise ConversionError(f"{filename}: tensor {name!r} has dtype {view.get_dtype()}, "
                                "which numpy cannot hold.")
      return {name: f.get_tensor(name) for name in expected}


def load_diffusers_state_dict(path: str, config: ml_collections.ConfigDict | None = None
                              ) -> dict[str, np.ndarray]:
  """The tensors of a diffusers .safetensors or torch .bin file (read without torch), or of a
  model directory holding one.

  With `config`, the file's names, shapes and floating dtypes are checked against the config's
  U-Net from the header alone (a ConversionError listing what does not fit), and only then its
  tensors are read. Any malformed file is one ConversionError naming it.
  """
  filename = diffusers_weights_file(path)
  if config is None:
    return read_weights(filename)
  header = weights_header(filename)
  keys, _ = _match_diffusers({name: spec.shape for name, spec in header.items()}, config,
                             f"The diffusers weights {filename}")
  for key in keys.values():
    if header[key].dtype not in _FLOAT_DTYPES:
      raise ConversionError(f"{filename}: tensor {key!r} has dtype {header[key].dtype}; U-Net "
                            "weights are float16, bfloat16, float32 or float64.")
  return read_weights(filename, {key: header[key].shape for key in keys.values()})


def _match_diffusers(
  shapes: Mapping[str, Shape], config: ml_collections.ConfigDict, what: str
) -> tuple[dict[str, str], dict[str, jax.ShapeDtypeStruct]]:
  """({our path: diffusers key}, expected variables) for {diffusers key: shape}; raises one
  ConversionError listing what does not fit the config (both attention key styles are read)."""
  attention = diffusers_attention_style(shapes)
  config_levels = len(config.model.ch_mult)
  down = {int(m.group(1)) for k in shapes if (m := re.match(r"down_blocks\.(\d+)\.", k))}
  num_levels = max(down) + 1 if down else config_levels
  return _check(
    what, config, shapes, lambda k: path_from_diffusers_key(k, num_levels, attention),
    lambda p: diffusers_key(p, config_levels, attention), torch_shape, shape_from_torch)


def from_diffusers(
  state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict
) -> Params:
  """The params of a diffusers `UNet2DModel` state dict (name -> numpy, PyTorch layouts).

  Both attention key styles are read (to_q/to_k/to_v/to_out.0 and query/key/value/proj_attn).
  Raises ConversionError when names or shapes do not fit the config (one message).
  """
  keys, expected = _match_diffusers(
    {k: tuple(np.shape(v)) for k, v in state_dict.items()}, config, "The diffusers state dict")
  return _unflatten({
    p: np.ascontiguousarray(from_torch_layout(p, np.asarray(state_dict[k]))).astype(
      expected[p].dtype) for p, k in keys.items()})


# -- Writing the checkpoint. --------------------------------------------------------------------


def imported_train_state(
  params: Params, config: ml_collections.ConfigDict, step: int
) -> train_state_lib.TrainState:
  """A TrainState at `step` with `params` as params and EMA params, and a fresh optimizer (the
  structure that `train.TrainLoop.init_fn` builds, so every mode restores it)."""
  optimizer = train_state_lib.make_optimizer(config.optim)
  _, state_rng = jax.random.split(jax.random.PRNGKey(config.training.seed))
  # One compiled program: hundreds of eager per-leaf ops are several times slower on CPU.
  create = jax.jit(lambda p, rng: train_state_lib.create_train_state(p, optimizer, rng))
  return create(params, state_rng).replace(step=jnp.asarray(step, jnp.int32))


def _existing_steps(directory: str) -> list[int]:
  """The step directories in `directory` (Orbax names each completed save by its step)."""
  import tensorflow as tf

  if not tf.io.gfile.isdir(directory):
    return []
  names = (name.rstrip("/") for name in tf.io.gfile.listdir(directory))
  return sorted(int(name) for name in names if name.isdigit())


def check_step_free(workdir: str, step: int) -> None:
  """Raises FileExistsError when `<workdir>/checkpoints/<step>` exists (it is never replaced)."""
  directory = os.path.join(workdir, "checkpoints")
  if step in _existing_steps(directory):
    raise FileExistsError(
      f"{directory}/{step} already exists; nothing was written. Use another --workdir, pass "
      f"--step with a free step, or delete {directory}/{step} to convert again.")


def save_checkpoint(params: Params, config: ml_collections.ConfigDict, workdir: str,
                    step: int) -> str:
  """Writes `<workdir>/checkpoints/<step>` holding `imported_train_state`; returns its path."""
  check_step_free(workdir, step)
  directory = os.path.join(workdir, "checkpoints")
  keep = len(_existing_steps(directory)) + 1  # Never delete a checkpoint already there.
  state = imported_train_state(params, config, step)
  with checkpointing.Checkpointer(directory, keep=keep, every_steps=0, async_save=False) as ckpt:
    ckpt.save(step, state, force=True)
  return os.path.join(directory, str(step))


def convert(
  source: str, input_path: str, config: ml_collections.ConfigDict, workdir: str,
  step: int | None = None, use_ema: bool = True,
) -> str:
  """Imports `input_path` ('tf' or 'diffusers') into `<workdir>/checkpoints/<step>`; its path.

  `step` defaults to the TF checkpoint's step (else 0). Nothing is written when the weights do
  not fit the config, the file is malformed or the step exists.
  """
  if step is not None and step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  if source == "tf":
    prefix = resolve_tf_checkpoint(input_path)
    step = tf_checkpoint_step(prefix) if step is None else step
    check_step_free(workdir, step)
    params = from_tf_checkpoint(prefix, config, use_ema=use_ema)
  elif source == "diffusers":
    step = 0 if step is None else step
    check_step_free(workdir, step)
    params = from_diffusers(load_diffusers_state_dict(input_path, config), config)
  else:
    raise ValueError(f"source must be 'tf' or 'diffusers', got {source!r}")
  return save_checkpoint(params, config, workdir, step)


# -- Command line. ------------------------------------------------------------------------------


def _define_flags() -> None:
  """The flags, defined only when run as a program (importing this module defines none)."""
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_enum("source", None, ["tf", "diffusers"],
                    "tf: an original TF1 checkpoint; diffusers: a UNet2DModel's safetensors.")
  flags.DEFINE_string("input", None, "tf: the checkpoint prefix (model.ckpt-790000) or its "
                      "directory; diffusers: diffusion_pytorch_model.safetensors (or .bin) or its "
                      "directory.")
  config_flags.DEFINE_config_file("config", None, "The config whose U-Net the weights fit.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Writes <workdir>/checkpoints/<step>.")
  flags.DEFINE_integer("step", None, "Checkpoint step, >= 0 (default: the TF checkpoint's, "
                       "else 0).")
  flags.DEFINE_bool("ema", True, "tf: take the ExponentialMovingAverage copies when present; "
                    "--noema takes the raw weights.")
  flags.mark_flags_as_required(["source", "input", "config", "workdir"])


class _QuietOrbax(logging.Filter):
  """Drops Orbax's INFO lines (as ddpm_jax.main does); its warnings and errors still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  from absl import app, flags
  from absl import logging as absl_logging
  from ml_collections import config_flags

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.get_absl_handler().addFilter(_QuietOrbax())
  f = flags.FLAGS
  if f.step is not None and f.step < 0:  # Orbax would write a step no mode can load.
    print(f"error: --step must be >= 0, got {f.step}; nothing was written.", file=sys.stderr)
    sys.exit(2)
  input_path, workdir = file_io.absolute(f.input), file_io.absolute(f.workdir)
  try:  # The config is validated by the mode that later uses the checkpoint.
    path = convert(f.source, input_path, f.config, workdir, f.step, f.ema)
  except (ConversionError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  config_file = config_flags.get_config_filename(f["config"])
  print(f"Wrote {path}. Sample with: python -m ddpm_jax.main --mode=sample "
        f"--config={config_file} --workdir={workdir}", flush=True)


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
