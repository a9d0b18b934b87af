"""Weights out: a run exported as a diffusers DDPMPipeline directory.

Without torch: the files, the bit-exact round trip (CIFAR-10, learned variances, the 256x256
architecture), the config mapping and its refusals, the command line. With the test-diffusers
extra: the directory loads with DDPMPipeline.from_pretrained, UNet2DModel gives our outputs, and
DDPMScheduler.step is our ancestral step.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, subprocess_env, tiny_digits_config
from flax import traverse_util

from configs import cifar10, lsun_church
from ddpm_jax import convert, diffusion, model_bundle
from ddpm_jax.checkpoints import readers
from ddpm_jax.checkpoints.checkpointer import Checkpointer, IncompatibleCheckpointError
from ddpm_jax.weights import diffusers as diffusers_weights
from ddpm_jax.weights import export, importer, matching

EXPORTED = [
  "README.md",
  "model_index.json",
  "scheduler/scheduler_config.json",
  "unet/config.json",
  "unet/diffusion_pytorch_model.safetensors",
]


def random_params(config, seed: int) -> dict:
  """Random float32 params of the config's U-Net, scaled like a trained network's (no layer near
  zero or identity, so a wrong mapping shows in the outputs)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in matching.variable_shapes(config).items():
    value = rng.standard_normal(leaf.shape, dtype=np.float32)
    fan_in = math.prod(leaf.shape[:-1]) if path.endswith("/kernel") else 100
    value *= np.float32(1 / math.sqrt(fan_in))
    flat[path] = value + np.float32(path.endswith("/scale"))
  return traverse_util.unflatten_dict(flat, sep="/")


def bits(params) -> dict[str, np.ndarray]:
  """{path: the raw bits} of float params (NaN payloads, -0.0 and subnormals compare exactly)."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  return {p: np.ascontiguousarray(v).view(f"u{v.dtype.itemsize}") for p, v in flat.items()}


def assert_bit_equal(actual, expected):
  a, e = bits(actual), bits(expected)
  assert sorted(a) == sorted(e)
  for path in e:
    assert a[path].dtype == e[path].dtype and a[path].shape == e[path].shape, path
    np.testing.assert_array_equal(a[path], e[path], err_msg=path)


def read_back(directory, config):
  """Our params of an exported directory, read as any diffusers model directory is."""
  state_dict = convert.load_diffusers_state_dict(str(directory), config)
  return convert.from_diffusers(state_dict, config)


def listing(directory) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(root, f), directory)
    for root, _, files in os.walk(directory)
    for f in files
  )


def learned_variance(config):
  config.diffusion.model_var_type = "learned_range"
  config.diffusion.loss_type = "hybrid"
  return config


# -- The round trip, bit for bit. --------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar10_learned_variance", "256x256_width32"])
def test_export_round_trip_is_bit_exact(name, tmp_path):
  """from_diffusers(export(params)) == params to the bit: the full CIFAR-10 U-Net (35.7M), with
  learned variances (6 output channels), and the 256x256 architecture (6 levels, attention at
  16x16) at width 32 (its full-size names and shapes: the next test)."""
  config = {
    "cifar10": cifar10.get_config,
    "cifar10_learned_variance": lambda: learned_variance(cifar10.get_config()),
    "256x256_width32": lsun_church.get_config,
  }[name]()
  if name.startswith("256"):
    config.model.ch = 32
  params = random_params(config, 0)
  kernel = params["down_0"]["block_0"]["conv1"]["kernel"]  # Values no float formatting keeps.
  kernel.flat[:5] = [-0.0, np.float32(1e-45), np.inf, np.nan, np.finfo(np.float32).max]
  assert export.to_diffusers(params, config, tmp_path / "out") == str(tmp_path / "out")
  assert listing(tmp_path / "out") == EXPORTED
  assert_bit_equal(read_back(tmp_path / "out", config), params)
  unet = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
  assert unet["_class_name"] == "UNet2DModel"
  assert unet["out_channels"] == (6 if "learned" in name else 3)
  assert len(unet["down_block_types"]) == (6 if name.startswith("256") else 4)


def test_256x256_names_and_shapes_at_full_size():
  """Every variable of the 113.7M-parameter U-Net (by jax.eval_shape) maps to a diffusers key
  and PyTorch shape and back; with torch, UNet2DModel of `unet2d_config` (on the meta device, no
  memory) has exactly those keys and shapes."""
  config = lsun_church.get_config()
  shapes = matching.variable_shapes(config)
  assert sum(math.prod(s.shape) for s in shapes.values()) == 113_673_219
  keys = {}
  for path, leaf in shapes.items():
    key = diffusers_weights.diffusers_key(path, 6)
    keys[key] = diffusers_weights.torch_shape(path, tuple(leaf.shape))
    assert diffusers_weights.path_from_diffusers_key(key, 6) == path
    assert diffusers_weights.shape_from_torch(path, keys[key]) == tuple(leaf.shape)
  assert len(keys) == len(shapes)
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):
    model = diffusers.UNet2DModel(**diffusers_weights.unet2d_config(config))
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys


def test_bfloat16_params_are_stored_as_float32_and_read_back_exactly(tmp_path):
  config = tiny_digits_config(**{"model.param_dtype": "bfloat16"})
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(config, 1))
  export.to_diffusers(params, config, tmp_path / "out")
  header = convert.load_diffusers_state_dict(str(tmp_path / "out"))
  assert {v.dtype for v in header.values()} == {np.dtype(np.float32)}
  assert_bit_equal(read_back(tmp_path / "out", config), params)


# -- The configs. ------------------------------------------------------------------------------


def test_the_config_files_are_diffusers_configs(tmp_path):
  config = tiny_digits_config()
  export.to_diffusers(random_params(config, 2), config, tmp_path)
  read = lambda name: json.loads((tmp_path / name).read_text())
  version = {"_diffusers_version": export.DIFFUSERS_VERSION}
  assert read("model_index.json") == {
    "_class_name": "DDPMPipeline",
    **version,
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
  }
  assert read("scheduler/scheduler_config.json") == {
    "_class_name": "DDPMScheduler",
    **version,
    **diffusers_weights.ddpm_scheduler_config(config),
  }
  unet = json.loads(json.dumps(diffusers_weights.unet2d_config(config)))  # Tuples as lists.
  assert read("unet/config.json") == {"_class_name": "UNet2DModel", **version, **unet}


def test_cifar10_maps_to_google_ddpm_cifar10_32():
  """The fields of google/ddpm-cifar10-32's unet/config.json and scheduler_config.json."""
  config = cifar10.get_config()
  unet = diffusers_weights.unet2d_config(config)
  assert (
    unet.items()
    >= {
      "sample_size": 32,
      "in_channels": 3,
      "out_channels": 3,
      "block_out_channels": (128, 256, 256, 256),
      "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
      "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
      "layers_per_block": 2,
      "attention_head_dim": None,
      "norm_eps": 1e-6,
      "norm_num_groups": 32,
      "downsample_padding": 0,
      "flip_sin_to_cos": False,
      "freq_shift": 1,
      "act_fn": "silu",
      "dropout": 0.1,
    }.items()
  )
  assert (
    diffusers_weights.ddpm_scheduler_config(config).items()
    >= {
      "num_train_timesteps": 1000,
      "beta_schedule": "linear",
      "beta_start": 1e-4,
      "beta_end": 0.02,
      "trained_betas": None,
      "variance_type": "fixed_large",
      "prediction_type": "epsilon",
      "clip_sample": True,
      "clip_sample_range": 1.0,
    }.items()
  )


@pytest.mark.parametrize(
  "field, value, diffusers_field, expected",
  [
    ("diffusion.beta_schedule", "quad", "beta_schedule", "scaled_linear"),
    ("diffusion.beta_schedule", "cosine", "beta_schedule", "squaredcos_cap_v2"),
    ("diffusion.model_var_type", "fixedsmall", "variance_type", "fixed_small"),
    ("diffusion.model_var_type", "learned_range", "variance_type", "learned_range"),
    ("diffusion.model_mean_type", "xstart", "prediction_type", "sample"),
    ("sample.clip_denoised", False, "clip_sample", False),
  ],
)
def test_scheduler_fields(field, value, diffusers_field, expected):
  config = tiny_digits_config(**{field: value})
  assert diffusers_weights.ddpm_scheduler_config(config)[diffusers_field] == expected


@pytest.mark.parametrize("schedule", ["const", "warmup10", "warmup50", "jsd"])
def test_other_schedules_are_written_as_trained_betas(schedule):
  config = tiny_digits_config(**{"diffusion.beta_schedule": schedule})
  betas = diffusers_weights.ddpm_scheduler_config(config)["trained_betas"]
  d = config.diffusion
  np.testing.assert_array_equal(
    np.array(betas),
    diffusion.get_beta_schedule(
      schedule, beta_start=d.beta_start, beta_end=d.beta_end, num_timesteps=d.num_timesteps
    ),
  )


# -- A run (checkpoints, config.json, metrics) and what cannot be exported. ------------------------


def make_run(workdir, config, steps: dict) -> str:
  """A run's workdir: config.json and checkpoints {step: (params, EMA params)}."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  directory = os.path.join(workdir, "checkpoints")
  with Checkpointer(directory, keep=len(steps), every_steps=0, async_save=False) as ckpt:
    for step, (params, ema_params) in steps.items():
      state = importer.imported_train_state(params, config, step).replace(ema_params=ema_params)
      ckpt.save(step, state, force=True)
  return str(workdir)


def write_metrics(workdir, step: int) -> None:
  """The metrics files training and --mode=eval write for checkpoint `step`."""

  def write(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(value, f)

  write(
    os.path.join(workdir, "samples", f"step_{step:08d}_sample_quality.json"),
    {"fid": 12.3456, "num_samples": 500.0},
  )
  write(
    os.path.join(workdir, f"eval_{step}", "bpd.json"),
    {"step": step, "split": "test", "n": 297, "mean": 3.14159, "stderr": 0.0123},
  )
  samples = os.path.join(workdir, f"samples_step{step}_ddim_50steps_eta0_seed1_0a1b2c3d")
  write(os.path.join(samples, "manifest.json"), {"checkpoint_step": step})
  write(
    os.path.join(samples, "sample_quality.json"),
    {"fid": 9.87, "inception_score": 2.5, "inception_score_std": 0.1, "num_samples": 1000.0},
  )
  other_step = os.path.join(workdir, "samples_step60_ddim_50steps_eta0_seed1_0a1b2c3d")
  write(os.path.join(other_step, "sample_quality.json"), {"fid": 1.0, "num_samples": 1.0})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny digits run with checkpoints 3 and 6 (raw and EMA params differ) and metrics of 6."""
  config = tiny_digits_config()
  params = {s: (random_params(config, s), random_params(config, 10 + s)) for s in (3, 6)}
  workdir = make_run(tmp_path_factory.mktemp("run") / "run", config, params)
  write_metrics(workdir, 6)
  return workdir, config, params


def run_convert(*args) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "ddpm_jax.convert", *args],
    env=subprocess_env(1),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )


@pytest.mark.parametrize(
  "field, value, message",
  [
    (
      "model.resamp_with_conv",
      False,
      r"config\.model\.resamp_with_conv=False cannot be exported to diffusers: UNet2DModel "
      r"resamples with 3x3 convolutions only",
    ),
    ("model.out_ch", 3, r"config\.model\.out_ch=3 cannot be exported .* must be 1, or 0\.$"),
    (
      "diffusion.model_mean_type",
      "xprev",
      r"config\.diffusion\.model_mean_type='xprev' cannot be exported .* \(xprev\)\.$",
    ),
    (
      "diffusion.model_var_type",
      "learned",
      r"config\.diffusion\.model_var_type='learned' cannot be exported .* as its log",
    ),
  ],
)
def test_what_diffusers_cannot_express_is_one_message_and_nothing_written(
  field, value, message, run, tmp_path
):
  workdir, config, params = run
  overrides = {field: value}
  if value == "learned":
    overrides["diffusion.loss_type"] = "kl"
  bad = tiny_digits_config(**overrides)
  with pytest.raises(convert.ConversionError, match=message) as e:
    export.export_run(workdir, tmp_path / "out", config=bad)
  assert "\n" not in str(e.value)
  with pytest.raises(convert.ConversionError, match=message):
    export.to_diffusers(params[6][1], bad, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_params_that_do_not_fit_the_config_name_every_problem(tmp_path):
  config = tiny_digits_config()
  params = random_params(config, 0)
  del params["mid"]["attn_1"]
  params["conv_in"]["kernel"] = np.zeros((3, 3, 1, 64), np.float32)
  with pytest.raises(convert.ConversionError, match="(?s)missing.*mid/attn_1/q/kernel.*mis-shaped"):
    export.to_diffusers(params, config, tmp_path / "out")
  assert not (tmp_path / "out").exists()


# -- The command line. ------------------------------------------------------------------------


def test_command_line_exports_the_latest_ema_params_with_a_model_card(run, tmp_path):
  workdir, config, params = run
  out = tmp_path / "hf"
  done = run_convert("--to=diffusers", f"--workdir={workdir}", f"--output={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == (
    f"Wrote {out} (EMA params of step 6). Load it with: "
    f'diffusers.DDPMPipeline.from_pretrained("{out}")'
  )
  assert listing(out) == EXPORTED
  assert_bit_equal(read_back(out, config), params[6][1])
  card = (out / "README.md").read_text()
  assert card.startswith("---\nlibrary_name: diffusers\n")
  for text in (
    f"Step 6 of the run `{os.path.basename(workdir)}`: the EMA of the parameters (decay 0.995)",
    "- Data: `digits` (8x8x1, pixels scaled to [-1, 1], no flips).",
    "- Diffusion: T = 20, linear betas (0.0001 to 0.02), predicts eps, variance fixedlarge",
    "num_inference_steps=20",
    "- FID 12.346 of 500 samples drawn at the end of training (against the train split in the "
    "digits' own feature space, not Inception's).",
    "- 3.1416 +- 0.0123 bits/dim on the 297 images of the test split",
    "- FID 9.870, IS 2.50 +- 0.10 of 1,000 samples against the train split in the digits' own "
    "feature space, not Inception's (samples_step6_ddim_50steps_eta0_seed1_0a1b2c3d).",
    '"num_res_blocks": 1,',  # The config, as JSON.
  ):
    assert text in card, text
  assert "FID 1.000" not in card  # Step 60's samples are not step 6's.

  again = run_convert("--to=diffusers", f"--workdir={workdir}", f"--output={out}")
  assert again.returncode == 2
  assert again.stderr.strip().splitlines()[-1] == (
    f"error: --output={out} is not empty; nothing was written. Pass --overwrite to replace an "
    "export there, or choose another --output."
  )


def test_command_line_exports_raw_params_of_a_step_over_an_export(run, tmp_path):
  workdir, config, params = run
  out = tmp_path / "hf"
  export.export_run(workdir, out)
  (out / "notes.txt").write_text("kept")
  done = run_convert(
    "--to=diffusers",
    f"--workdir={workdir}",
    f"--output={out}",
    "--step=3",
    "--ema=false",
    "--overwrite",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "(raw params of step 3)" in done.stdout
  assert_bit_equal(read_back(out, config), params[3][0])
  card = (out / "README.md").read_text()
  assert "Step 3 of the run" in card and "the raw parameters (not their EMA)" in card
  assert "## Metrics\n\nNone recorded with these weights." in card
  assert (out / "notes.txt").read_text() == "kept"


def test_raw_params_metrics_are_marked_as_the_ema_params(run, tmp_path):
  workdir, _, _ = run
  export.export_run(workdir, tmp_path / "out", use_ema=False)
  card = (tmp_path / "out" / "README.md").read_text()
  assert "Measured on the run's EMA parameters, not on the raw ones exported here:" in card


@pytest.mark.parametrize(
  "args, message",
  [
    ([], "pass --source=tf|diffusers to import weights into a run, or --to=diffusers to export "),
    (["--to=diffusers", "--workdir=x"], "--to=diffusers needs --output."),
    (["--to=diffusers", "--workdir=x", "--output=y", "--input=z"], "--input cannot be used with"),
    (["--source=tf", "--input=x", "--workdir=y"], "--source=tf needs --config."),
    (["--source=tf", "--to=diffusers"], "(not both)."),
  ],
)
def test_command_line_flag_errors_are_one_line(args, message, capsys):
  """`_check_flags` on flags of the same names and kinds as the command line's."""
  from absl import flags

  from ddpm_jax import convert as convert_module

  values = flags.FlagValues()
  for name in ("source", "to", "input", "config", "workdir", "output"):
    flags.DEFINE_string(name, None, "", flag_values=values)
  flags.DEFINE_bool("overwrite", False, "", flag_values=values)
  flags.DEFINE_integer("step", None, "", flag_values=values)
  values(["convert", *args])
  with pytest.raises(SystemExit) as e:
    convert_module._check_flags(values)
  assert e.value.code == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("error: ") and message in line


def test_step_and_config_errors_name_what_to_do(run, tmp_path):
  workdir, config, _ = run
  with pytest.raises(readers.NoCheckpointError, match=r"available steps: \[3, 6\]\. Pass --step"):
    export.export_run(workdir, tmp_path / "out", step=4)
  empty = tmp_path / "imported"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json does not exist .* pass --config=FILE"):
    export.export_run(str(empty), tmp_path / "out")
  (tmp_path / "file").write_text("")
  with pytest.raises(FileExistsError, match="is a file, not a directory; nothing was written"):
    export.export_run(workdir, tmp_path / "file")
  other = tiny_digits_config(**{"model.num_res_blocks": 2})  # Not the run's U-Net.
  with pytest.raises(IncompatibleCheckpointError, match="down_0/block_1"):
    export.export_run(workdir, tmp_path / "out", config=other)
  assert not (tmp_path / "out").exists()


def test_command_line_refuses_a_config_diffusers_cannot_express(run, tmp_path):
  workdir, _, _ = run
  done = run_convert(
    "--to=diffusers",
    f"--workdir={workdir}",
    f"--output={tmp_path / 'out'}",
    f"--config={REPO}/configs/digits.py",
    "--config.model.num_res_blocks=1",
    "--config.diffusion.num_timesteps=20",
    "--config.diffusion.model_mean_type=xprev",
  )
  assert done.returncode == 2
  (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
  assert line.startswith("error: config.diffusion.model_mean_type='xprev' cannot be exported")
  assert not (tmp_path / "out").exists()


# -- With diffusers (the test-diffusers extra). ------------------------------------------------


@pytest.fixture(scope="module")
def torch_diffusers():
  return pytest.importorskip("torch"), pytest.importorskip("diffusers")


def nchw(x: np.ndarray):
  import torch

  return torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))  # A writable copy.


def nhwc(x) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("variance", ["fixedlarge", "learned_range"])
def test_ddpm_pipeline_loads_the_export_and_its_unet_gives_our_outputs(
  variance, tmp_path, torch_diffusers
):
  torch, diffusers = torch_diffusers
  config = tiny_digits_config(**{"model.dropout": 0.1})
  if variance == "learned_range":
    learned_variance(config)
  params = random_params(config, 3)
  export.to_diffusers(params, config, tmp_path / "out")
  pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "out"))
  assert (
    type(pipe.unet) is diffusers.UNet2DModel and type(pipe.scheduler) is diffusers.DDPMScheduler
  )
  assert pipe.scheduler.config.variance_type == {"fixedlarge": "fixed_large"}.get(
    variance, variance
  )
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  t = np.array([0, 1, 10, 19], np.int32)
  model = model_bundle.create_model(config)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, x, t))
  with torch.no_grad():
    theirs = nhwc(pipe.unet.eval()(nchw(x), torch.from_numpy(t)).sample)
  assert ours.shape == theirs.shape == (4, 8, 8, 2 if variance == "learned_range" else 1)
  assert ours.std() > 0.1
  print(f"{variance}: max |UNet2DModel - ours| {np.abs(theirs - ours).max():.2e}")
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)  # Measured: 2.9e-6, 3.2e-6.

  generator = torch.Generator().manual_seed(0)
  images = pipe(batch_size=3, generator=generator, num_inference_steps=5, output_type="np").images
  assert images.shape == (3, 8, 8, 1) and np.all((images >= 0) & (images <= 1))


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall", "learned_range"])
@pytest.mark.parametrize("mean, clip", [("eps", True), ("eps", False), ("xstart", True)])
def test_ddpm_scheduler_step_is_our_ancestral_step(
  variance, mean, clip, tmp_path, monkeypatch, torch_diffusers
):
  """The exported DDPMScheduler's `step` against our `p_sample` (T = 1000, linear betas), with
  the same model output and noise, at t from 0 to 999 as DDPMPipeline calls it.

  Its own step code with its tables computed in float64, as ours are, gives our step to 1e-6 at
  every t. As loaded its tables are float32 (betas, their cumprod abar, and 1 - abar_t and
  1 - abar_t / abar_{t-1} taken in float32), which near t = 0, where 1 - abar_t is small, puts
  it up to 2.4e-4 from ours for t < 24; from t = 50 on it agrees to 1e-5.
  """
  torch, diffusers = torch_diffusers
  from diffusers.schedulers import scheduling_ddpm

  overrides = {
    "diffusion.num_timesteps": 1000,
    "diffusion.model_var_type": variance,
    "diffusion.model_mean_type": mean,
    "sample.clip_denoised": clip,
  }
  if variance == "learned_range":
    overrides["diffusion.loss_type"] = "hybrid"
  config = tiny_digits_config(**overrides)
  export.to_diffusers(random_params(config, 0), config, tmp_path / "out")
  scheduler = diffusers.DDPMScheduler.from_pretrained(str(tmp_path / "out"), subfolder="scheduler")
  scheduler.set_timesteps(1000)  # As DDPMPipeline does.
  d = model_bundle.create_diffusion(config)
  exact = diffusers.DDPMScheduler.from_config(scheduler.config)
  exact.set_timesteps(1000)
  for name in ("betas", "alphas", "alphas_cumprod"):  # Float64 tables, as ours.
    setattr(exact, name, torch.from_numpy(np.array(getattr(d, name))))

  step = jax.jit(lambda out, x, t, key: d.p_sample(lambda *_: out, x, t, key, clip)["sample"])
  channels = 2 if variance == "learned_range" else 1
  rng = np.random.default_rng(1)
  worst = {"exact": 0.0, "t < 50": 0.0, "t >= 50": 0.0}
  for t in [0, 1, 2, 3, 5, 10, 23, 49, 50, 100, 250, 500, 750, 998, 999]:
    x = rng.standard_normal((4, 8, 8, 1), dtype=np.float32)
    output = rng.standard_normal((4, 8, 8, channels), dtype=np.float32)
    if channels == 2:
      output[..., 1:] = rng.uniform(-1, 1, (4, 8, 8, 1))  # learned_range's interpolation.
    key = jax.random.PRNGKey(t)
    ours = np.asarray(step(output, x, jnp.full((4,), t, jnp.int32), key))
    noise = nchw(np.asarray(jax.random.normal(key, x.shape)))  # What p_sample draws from key.
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, z=noise, **k: z)
    for name, sched in (("exact", exact), ("t < 50" if t < 50 else "t >= 50", scheduler)):
      theirs = nhwc(sched.step(nchw(output), t, nchw(x)).prev_sample)
      worst[name] = max(worst[name], float(np.abs(theirs - ours).max()))
    if t == 0:  # The last step adds no noise in either (so fixedlarge's log beta~_1 is unused).
      monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, z=5 * noise, **k: z)
      np.testing.assert_array_equal(
        nhwc(scheduler.step(nchw(output), 0, nchw(x)).prev_sample), theirs
      )
      np.testing.assert_array_equal(
        np.asarray(step(output, x, jnp.zeros((4,), jnp.int32), jax.random.PRNGKey(7))), ours
      )
  print(f"{variance} {mean} clip={clip}: max |diffusers - ours| {worst}")
  assert worst["exact"] <= 1e-6
  assert worst["t >= 50"] <= 1e-5
  assert worst["t < 50"] <= 5e-4


def test_the_pipelines_chain_is_our_ancestral_sampler(tmp_path, monkeypatch, torch_diffusers):
  """DDPMPipeline's loop (UNet2DModel, then DDPMScheduler.step, over all T = 100 steps) from the
  same x_T with the same noise at each step as our `p_sample` chain ends at our samples (the
  digits run of 200 steps, T = 1000: 3.6e-5, not one uint8 pixel apart)."""
  torch, diffusers = torch_diffusers
  from diffusers.schedulers import scheduling_ddpm

  config = tiny_digits_config(**{"diffusion.num_timesteps": 100, "model.ch_mult": (1,)})
  config.model.attn_resolutions = ()
  params = random_params(config, 4)
  export.to_diffusers(params, config, tmp_path / "out")
  pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "out"))
  pipe.scheduler.set_timesteps(100)
  bundle = model_bundle.ModelBundle.from_config(config)
  model_fn = lambda x, t: bundle.model.apply({"params": params}, x, t)
  step = jax.jit(lambda x, t, key: bundle.diffusion.p_sample(model_fn, x, t, key)["sample"])
  x_t = np.random.default_rng(5).standard_normal((4, 8, 8, 1), dtype=np.float32)
  ours, theirs = jnp.asarray(x_t), nchw(x_t)
  for t in pipe.scheduler.timesteps.tolist():
    key = jax.random.PRNGKey(t)
    ours = step(ours, jnp.full((4,), t, jnp.int32), key)
    noise = nchw(np.asarray(jax.random.normal(key, x_t.shape)))
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, z=noise, **k: z)
    with torch.no_grad():
      theirs = pipe.scheduler.step(pipe.unet(theirs, t).sample, t, theirs).prev_sample
  ours, theirs = np.asarray(ours), nhwc(theirs)
  print(f"after 100 steps: max |diffusers - ours| {np.abs(theirs - ours).max():.2e}")
  assert ours.std() > 0.1
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=5e-4)  # Measured: 7.2e-5.


@pytest.mark.parametrize("schedule", diffusion.BETA_SCHEDULES)
def test_diffusers_betas_are_ours_in_float32(schedule, torch_diffusers):
  _, diffusers = torch_diffusers
  config = tiny_digits_config(
    **{"diffusion.beta_schedule": schedule, "diffusion.num_timesteps": 1000}
  )
  scheduler = diffusers.DDPMScheduler(**diffusers_weights.ddpm_scheduler_config(config))
  d = config.diffusion
  ours = diffusion.get_beta_schedule(
    schedule, beta_start=d.beta_start, beta_end=d.beta_end, num_timesteps=d.num_timesteps
  )
  theirs = scheduler.betas.double().numpy()
  if schedule in ("linear", "quad"):  # torch.linspace in float32: a few ulps.
    np.testing.assert_allclose(theirs, ours, rtol=5e-7, atol=0)
  else:  # trained_betas, and cosine from the same formula in float64: ours rounded.
    np.testing.assert_array_equal(theirs, ours.astype(np.float32))


# -- Class-conditional models: UNet2DModel(num_class_embeds=N + 1). ------------------------------


def conditional(config, num_classes=3):
  config.model.num_classes = num_classes
  return config


def test_class_conditional_params_round_trip_with_the_null_class_row(tmp_path):
  config = conditional(tiny_digits_config())
  params = random_params(config, 5)
  state_dict = diffusers_weights.to_diffusers_state_dict(params)
  table = state_dict["class_embedding.weight"]
  assert table.shape == (4, 4 * config.model.ch) and not table[3].any()  # The null class: zero.
  assert diffusers_weights.unet2d_config(config)["num_class_embeds"] == 4
  assert_bit_equal(convert.from_diffusers(state_dict, config), params)
  export.to_diffusers(params, config, tmp_path / "out")
  assert_bit_equal(read_back(tmp_path / "out", config), params)
  card = (tmp_path / "out" / "README.md").read_text()
  assert "class_labels=torch.full_like(y, 3)" in card and "(1 + w) * eps_c - w * eps_u" in card
  # A learned null embedding is not ddpm_jax's null class (the unconditional model): refused.
  table[3, 0] = 0.5
  with pytest.raises(convert.ConversionError, match=r"class_embedding\.weight: its last row"):
    convert.from_diffusers(state_dict, config)


def test_class_conditional_unet2dmodel_gives_our_outputs(tmp_path, torch_diffusers):
  torch, diffusers = torch_diffusers
  config = conditional(tiny_digits_config(**{"model.dropout": 0.0}))
  params = random_params(config, 6)
  export.to_diffusers(params, config, tmp_path / "out")
  unet = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "out" / "unet")).eval()
  assert unet.config.num_class_embeds == 4
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  t = np.array([0, 3, 10, 19], np.int32)
  y = np.array([0, 1, 2, 3], np.int32)  # 3: the null class.
  model = model_bundle.create_model(config)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, x, t, y=y))
  unconditional = np.asarray(jax.jit(model.apply)({"params": params}, x, t))
  np.testing.assert_array_equal(ours[3], unconditional[3])
  with torch.no_grad():
    theirs = nhwc(unet(nchw(x), torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample)
  assert ours.std() > 0.1 and np.abs(ours[:3] - unconditional[:3]).max() > 1e-2
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
