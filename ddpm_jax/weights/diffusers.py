"""diffusers' `UNet2DModel` (the `google/ddpm-*` models): names, PyTorch layouts, reading its
weights files and converting its state dicts both ways.

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
  class_embed/embedding [N, D] class_embedding (num_class_embeds = N + 1)   the null class's row
                              (the last, which ddpm_jax keeps at zero: the unconditional model)
GroupNorm weight/bias -> scale/bias. diffusers pads the stride-2 downsample conv by (0, 1, 0, 1)
with `downsample_padding=0`, and its `Timesteps(flip_sin_to_cos=False, freq_shift=1)` is our
[sin, cos] embedding: both equal the original's (tests/test_convert.py checks outputs).

`unet2d_config(config)` and `ddpm_scheduler_config(config)` are the `UNet2DModel` and
`DDPMScheduler` configs of one of ours; a field with no counterpart is one ConversionError naming
it. What diffusers cannot express: `model.resamp_with_conv=False` (its blocks resample with
convolutions only), a `model.out_ch` other than the image channels (doubled with a learned
variance), `diffusion.model_mean_type='xprev'` and `diffusion.model_var_type='learned'` (its
'learned' reads the output as the variance, ours as the log variance). A class-conditional model
exports as UNet2DModel with `num_class_embeds` (DDPMPipeline itself passes no labels: run the
UNet with `class_labels`, and guidance in your own loop).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import model_bundle
from ddpm_jax.weights import files
from ddpm_jax.weights.matching import ConversionError, Params, Shape, check, is_norm, unflatten

_DIFFUSERS_FILENAME = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_BIN_FILENAME = "diffusion_pytorch_model.bin"
_DIFFUSERS_TOP = {
  "temb/dense0": "time_embedding.linear_1",
  "temb/dense1": "time_embedding.linear_2",
  "conv_in": "conv_in",
  "norm_out": "conv_norm_out",
  "conv_out": "conv_out",
  "class_embed": "class_embedding",  # Class-conditional models: one more row, the null class.
}
_CLASS_EMBEDDING = "class_embed/embedding"
_DIFFUSERS_RESNET = {
  "norm1": "norm1",
  "conv1": "conv1",
  "temb_proj": "time_emb_proj",
  "norm2": "norm2",
  "conv2": "conv2",
  "nin_shortcut": "conv_shortcut",
}
# Attention key styles: diffusers >= 0.15 `Attention` ("new") and the older `AttentionBlock`.
DIFFUSERS_ATTENTION = {
  "new": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
  "old": {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"},
}


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
  r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)\.(weight|bias)"
)
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
  if module == "class_embed":
    return "embedding"
  return "scale" if is_norm(module.split("/")[-1]) else "kernel"


def torch_shape(path: str, shape: Shape) -> Shape:
  """Our shape -> the PyTorch layout: conv HWIO -> OIHW, dense [in, out] -> [out, in], and the
  ResBlock shortcut (our dense) -> a 1x1 conv [out, in, 1, 1]; the class embedding [N, D] ->
  diffusers' [N + 1, D] with the null class's row."""
  if path == _CLASS_EMBEDDING:
    return (shape[0] + 1, *shape[1:])
  if not path.endswith("/kernel"):
    return shape
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return (shape[1], shape[0], 1, 1) if "/nin_shortcut/" in path else (shape[1], shape[0])


def shape_from_torch(path: str, shape: Shape) -> Shape:
  """The inverse of `torch_shape` (a 4-D shortcut becomes [in, out])."""
  if path == _CLASS_EMBEDDING:
    return (shape[0] - 1, *shape[1:])
  if not path.endswith("/kernel"):
    return shape
  if len(shape) == 4:
    return (shape[1], shape[0]) if "/nin_shortcut/" in path else (*shape[2:], shape[1], shape[0])
  return shape[::-1]


def from_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  """A PyTorch tensor (numpy) -> our layout; the inverse of `torch_shape`. Raises
  ConversionError for a class embedding whose null row is not zero."""
  if path == _CLASS_EMBEDDING:
    if np.any(value[-1] != 0):
      raise ConversionError(
        "class_embedding.weight: its last row (the null class of classifier-free guidance) is "
        "not zero; in ddpm_jax the null class is exactly the unconditional model, so only "
        "models whose null embedding is zero (as ddpm_jax exports them) convert."
      )
    return value[:-1]
  if not path.endswith("/kernel"):
    return value
  if value.ndim == 4 and "/nin_shortcut/" in path:
    return value[:, :, 0, 0].T
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def to_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  """Our array -> the PyTorch layout (see `torch_shape`)."""
  if path == _CLASS_EMBEDDING:
    return np.concatenate([value, np.zeros((1, *value.shape[1:]), value.dtype)])
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
      to_torch_layout(path, np.asarray(value))
    )
    for path, value in flat.items()
  }


def diffusers_attention_style(keys: Any) -> str:
  """'old' when the state dict uses the older query/key/value/proj_attn names, else 'new'."""
  old = re.compile(r".*\.attentions\.\d+\.(query|key|value|proj_attn)\.(weight|bias)")
  return "old" if any(old.fullmatch(k) for k in keys) else "new"


_FROM_BIN = (
  "Download diffusion_pytorch_model.safetensors (or .bin) from the model's page, e.g. "
  "google/ddpm-cifar10-32."
)


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


def load_diffusers_state_dict(
  path: str, config: ml_collections.ConfigDict | None = None
) -> dict[str, np.ndarray]:
  """The tensors of a diffusers .safetensors or torch .bin file (read without torch), or of a
  model directory holding one.

  With `config`, the file's names, shapes and floating dtypes are checked against the config's
  U-Net from the header alone (a ConversionError listing what does not fit), and only then its
  tensors are read. Any malformed file is one ConversionError naming it.
  """
  filename = diffusers_weights_file(path)
  if config is None:
    return files.read_weights(filename)
  header = files.weights_header(filename)
  keys, _ = _match_diffusers(
    {name: spec.shape for name, spec in header.items()}, config, f"The diffusers weights {filename}"
  )
  for key in keys.values():
    if header[key].dtype not in files.FLOAT_DTYPES:
      raise ConversionError(
        f"{filename}: tensor {key!r} has dtype {header[key].dtype}; U-Net "
        "weights are float16, bfloat16, float32 or float64."
      )
  return files.read_weights(filename, {key: header[key].shape for key in keys.values()})


def _match_diffusers(
  shapes: Mapping[str, Shape], config: ml_collections.ConfigDict, what: str
) -> tuple[dict[str, str], dict[str, jax.ShapeDtypeStruct]]:
  """({our path: diffusers key}, expected variables) for {diffusers key: shape}; raises one
  ConversionError listing what does not fit the config (both attention key styles are read)."""
  attention = diffusers_attention_style(shapes)
  config_levels = len(config.model.ch_mult)
  down = {int(m.group(1)) for k in shapes if (m := re.match(r"down_blocks\.(\d+)\.", k))}
  num_levels = max(down) + 1 if down else config_levels
  return check(
    what,
    config,
    shapes,
    lambda k: path_from_diffusers_key(k, num_levels, attention),
    lambda p: diffusers_key(p, config_levels, attention),
    torch_shape,
    shape_from_torch,
  )


def from_diffusers(
  state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict
) -> Params:
  """The params of a diffusers `UNet2DModel` state dict (name -> numpy, PyTorch layouts).

  Both attention key styles are read (to_q/to_k/to_v/to_out.0 and query/key/value/proj_attn).
  Raises ConversionError when names or shapes do not fit the config (one message).
  """
  keys, expected = _match_diffusers(
    {k: tuple(np.shape(v)) for k, v in state_dict.items()}, config, "The diffusers state dict"
  )
  return unflatten(
    {
      p: np.ascontiguousarray(from_torch_layout(p, np.asarray(state_dict[k]))).astype(
        expected[p].dtype
      )
      for p, k in keys.items()
    }
  )


# -- Configs: our config -> diffusers' UNet2DModel and DDPMScheduler. ---------------------------

# Our schedules that diffusers names; the others are written out as `trained_betas`.
_BETA_SCHEDULES = {"linear": "linear", "quad": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_PREDICTION_TYPES = {"eps": "epsilon", "xstart": "sample"}
_VARIANCE_TYPES = {
  "fixedlarge": "fixed_large",
  "fixedsmall": "fixed_small",
  "learned_range": "learned_range",
}


def _no_counterpart(field: str, value: Any, why: str) -> ConversionError:
  return ConversionError(f"config.{field}={value!r} cannot be exported to diffusers: {why}.")


def unet2d_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """diffusers `UNet2DModel` kwargs of the config's U-Net (google/ddpm-cifar10-32's fixed fields).

  Level i (resolution image_size / 2**i) is an Attn{Down,Up}Block2D when that resolution is in
  `attn_resolutions`; diffusers lists the up blocks from the bottom. Raises ConversionError for
  a field UNet2DModel cannot express. The compute dtype, remat and conv_impl change how the
  network runs, not what it computes: they have no counterpart and need none.
  """
  m, channels = config.model, config.data.num_channels
  if not m.resamp_with_conv:
    raise _no_counterpart(
      "model.resamp_with_conv",
      m.resamp_with_conv,
      "UNet2DModel resamples with 3x3 convolutions only (its down and up blocks have no "
      "average pooling or plain nearest-neighbour resampling)",
    )
  num_classes = m.get("num_classes", 0)
  learned = config.diffusion.model_var_type in diffusion_lib.LEARNED_VAR_TYPES
  out_channels = channels * (2 if learned else 1)
  if model_bundle.model_out_channels(config) != out_channels:
    raise _no_counterpart(
      "model.out_ch",
      m.out_ch,
      f"diffusers' DDPM pipeline reads the U-Net's output as the {channels} channels of the "
      "prediction (followed by as many variance channels with a learned variance), so it must "
      f"be {out_channels}, or 0",
    )
  size, mults = config.data.image_size, tuple(m.ch_mult)
  attn = [size // 2**i in tuple(m.attn_resolutions) for i in range(len(mults))]
  return dict(
    sample_size=size,
    in_channels=channels,
    out_channels=out_channels,
    center_input_sample=False,
    time_embedding_type="positional",
    freq_shift=1,
    flip_sin_to_cos=False,
    down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
    mid_block_type="UNetMidBlock2D",
    up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
    block_out_channels=tuple(m.ch * mult for mult in mults),
    layers_per_block=m.num_res_blocks,
    mid_block_scale_factor=1,
    downsample_padding=0,
    downsample_type="conv",
    upsample_type="conv",
    dropout=float(m.dropout),
    act_fn="silu",
    attention_head_dim=None,
    norm_num_groups=32,
    attn_norm_num_groups=None,
    norm_eps=1e-6,
    resnet_time_scale_shift="default",
    add_attention=True,
    class_embed_type=None,
    # Class-conditional: `class_labels` 0..N-1, and N the null class (a zero row).
    num_class_embeds=num_classes + 1 if num_classes else None,
  )


def ddpm_scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """diffusers `DDPMScheduler` kwargs of the config's diffusion and ancestral sampler.

  linear, quad and cosine are diffusers' linear, scaled_linear and squaredcos_cap_v2 (the same
  formulas, cosine with max_beta 0.999); the other schedules are written out as `trained_betas`.
  model_mean_type eps / xstart is prediction_type epsilon / sample, model_var_type fixedlarge /
  fixedsmall / learned_range is variance_type fixed_large / fixed_small / learned_range, and
  sample.clip_denoised is clip_sample (to [-1, 1]). diffusers computes its tables in float32.
  Raises ConversionError for xprev and learned, which diffusers cannot express.
  """
  d = config.diffusion
  if d.model_mean_type not in _PREDICTION_TYPES:
    raise _no_counterpart(
      "diffusion.model_mean_type",
      d.model_mean_type,
      "DDPMScheduler's prediction_type is the noise (epsilon), x_0 (sample) or v, never the "
      "posterior mean x_{t-1} (xprev)",
    )
  if d.model_var_type not in _VARIANCE_TYPES:
    raise _no_counterpart(
      "diffusion.model_var_type",
      d.model_var_type,
      "DDPMScheduler's variance_type 'learned' reads the U-Net's variance channels as the "
      "variance, ours as its log; learned_range, fixedlarge and fixedsmall export",
    )
  betas = diffusion_lib.get_beta_schedule(
    d.beta_schedule, beta_start=d.beta_start, beta_end=d.beta_end, num_timesteps=d.num_timesteps
  )
  named = d.beta_schedule in _BETA_SCHEDULES
  return dict(
    num_train_timesteps=int(d.num_timesteps),
    beta_start=float(d.beta_start),
    beta_end=float(d.beta_end),
    beta_schedule=_BETA_SCHEDULES.get(d.beta_schedule, "linear"),
    trained_betas=None if named else [float(b) for b in betas],
    variance_type=_VARIANCE_TYPES[d.model_var_type],
    clip_sample=bool(config.sample.clip_denoised),
    clip_sample_range=1.0,
    prediction_type=_PREDICTION_TYPES[d.model_mean_type],
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    timestep_spacing="leading",
    steps_offset=0,
    rescale_betas_zero_snr=False,
  )
