"""Matching weights to a config's U-Net: the expected variables, one message for what does not fit
(missing, unexpected, mis-shaped), and the config those weights would fit."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from ddpm_jax import model_bundle

Params = dict[str, Any]
Shape = tuple[int, ...]
_MAX_LISTED = 10


class ConversionError(ValueError):
  """The weights' names or shapes do not fit the config's U-Net (or cannot be read)."""


def variable_shapes(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The U-Net's parameters of `config`, path ('down_0/block_0/conv1/kernel') -> shape and dtype,
  by `jax.eval_shape` (nothing is computed). CIFAR-10: 328 variables."""
  return traverse_util.flatten_dict(model_bundle.abstract_params(config), sep="/")


def unflatten(flat: Mapping[str, np.ndarray]) -> Params:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def is_norm(layer: str) -> bool:
  """GroupNorm layers are the only ones named norm, norm1, norm2, norm_out."""
  return layer.startswith("norm")


def one_line(text: Any, limit: int = 400) -> str:
  """`text` on one line, cut to `limit` characters."""
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


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
  for title, items in (
    ("missing", missing),
    ("unexpected", unexpected),
    ("mis-shaped", mis_shaped),
  ):
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
      "num_classes": shapes["class_embed/embedding"][0] if "class_embed/embedding" in shapes else 0,
    }
  except (KeyError, IndexError, ValueError):
    return None


def _config_architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
  m, size = config.model, config.data.image_size
  return {
    "ch": m.ch,
    "ch_mult": tuple(m.ch_mult),
    "num_res_blocks": m.num_res_blocks,
    "attn_levels": tuple(i for i in range(len(m.ch_mult)) if size >> i in m.attn_resolutions),
    "num_channels": config.data.num_channels,
    "out_ch": model_bundle.model_out_channels(config),
    "num_classes": m.get("num_classes", 0),
  }


def _overrides(arch: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """The --config flags that make `config`'s U-Net the architecture `arch`."""
  have = _config_architecture(config)
  flags = []
  fields = (
    "ch",
    "ch_mult",
    "num_res_blocks",
    "num_channels",
    "out_ch",
    "attn_levels",
    "num_classes",
  )
  for field in fields:
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


def _configs_dir() -> str:
  """The repository's configs/ (next to the package in a checkout; absent from a wheel)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def _load_config(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"_ddpm_jax_config_{os.path.basename(path)}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def suggest_config(arch: Mapping[str, Any], configs_dir: str | None = None) -> str:
  """The configs/*.py files (with --config overrides if needed) whose U-Net is `arch`: those
  needing the fewest overrides (the 256x256 models share one architecture)."""
  configs_dir = configs_dir or _configs_dir()
  names = (
    sorted(f[:-3] for f in os.listdir(configs_dir) if f.endswith(".py"))
    if os.path.isdir(configs_dir)
    else []
  )
  candidates: dict[str, list[str]] = {}
  for name in names:
    if name in ("default", "__init__"):
      continue
    try:
      candidates[name] = _overrides(arch, _load_config(os.path.join(configs_dir, f"{name}.py")))
    except Exception:  # noqa: BLE001 - a broken config file must not hide the real error.
      continue
  if not candidates:
    return "a config with the fields above"
  fewest = min(len(flags) for flags in candidates.values())
  return " or ".join(
    " ".join([f"--config=configs/{name}.py", *flags])
    for name, flags in sorted(candidates.items())
    if len(flags) == fewest
  )


def _describe(arch: Mapping[str, Any]) -> str:
  return (
    f"ch={arch['ch']}, ch_mult={arch['ch_mult']}, num_res_blocks={arch['num_res_blocks']}, "
    f"attention at level(s) {arch['attn_levels']}, {arch['num_channels']} input and "
    f"{arch['out_ch']} output channels"
    + (f", {arch['num_classes']} classes" if arch["num_classes"] else "")
  )


def _conversion_error(
  what: str, problems: list[str], config: ml_collections.ConfigDict, found: Mapping[str, Shape]
) -> ConversionError:
  """One message: what does not fit, the architecture found, and the config to use."""
  lines = [
    f"{what} does not fit the U-Net of the config ({_describe(_config_architecture(config))}"
    f", image size {config.data.image_size}):",
    *problems,
  ]
  arch = _architecture(found)
  if arch is not None:
    lines.append(
      f"The weights hold a U-Net with {_describe(arch)}; convert them with {suggest_config(arch)}."
    )
  else:
    lines.append(
      "Use the config the weights were trained with (e.g. configs/cifar10.py for "
      "CIFAR-10, configs/lsun_church.py for the 256x256 models)."
    )
  return ConversionError("\n".join(lines))


def check(
  what: str,
  config: ml_collections.ConfigDict,
  source_shapes: Mapping[str, Shape],
  path_of: Callable[[str], str | None],
  source_key: Callable[[str], str],
  source_shape: Callable[[str, Shape], Shape],
  our_shape: Callable[[str, Shape], Shape],
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
