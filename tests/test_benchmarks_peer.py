"""benchmarks.peer: the diffusers UNet2DModel of our configs, its weights, timings and CLI."""

import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from conftest import tiny_digits_config  # noqa: E402
from flax import traverse_util  # noqa: E402
from test_convert import random_params  # noqa: E402

from benchmarks import ours, peer  # noqa: E402
from configs import cifar10, digits  # noqa: E402
from ddpm_jax import diffusion as diffusion_lib  # noqa: E402
from ddpm_jax import model_bundle, parallel  # noqa: E402
from ddpm_jax.sampling import samplers  # noqa: E402
from ddpm_jax.weights import diffusers as diffusers_weights  # noqa: E402
from ddpm_jax.weights import matching  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("get_config", [cifar10.get_config, digits.get_config])
def test_unet2d_config_has_our_variables(get_config):
  config = get_config()
  model = peer.build_model(config)
  shapes = matching.variable_shapes(config)
  num_levels = len(config.model.ch_mult)
  ours = {
    diffusers_weights.diffusers_key(p, num_levels): diffusers_weights.torch_shape(p, tuple(s.shape))
    for p, s in shapes.items()
  }
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ours
  assert sum(p.numel() for p in model.parameters()) == sum(
    math.prod(s.shape) for s in shapes.values()
  )


def test_unet2d_config_fields():
  kwargs = peer.unet2d_config(cifar10.get_config())
  assert kwargs["block_out_channels"] == (128, 256, 256, 256)
  assert kwargs["down_block_types"] == (
    "DownBlock2D",
    "AttnDownBlock2D",
    "DownBlock2D",
    "DownBlock2D",
  )
  assert kwargs["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
  assert (kwargs["dropout"], kwargs["out_channels"], kwargs["layers_per_block"]) == (0.1, 3, 2)
  kwargs = peer.unet2d_config(digits.get_config())
  assert kwargs["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D")
  assert kwargs["up_block_types"] == ("AttnUpBlock2D", "UpBlock2D")
  assert (kwargs["in_channels"], kwargs["out_channels"], kwargs["sample_size"]) == (1, 1, 8)
  config = digits.get_config()
  config.model.resamp_with_conv = False
  with pytest.raises(ValueError, match="resamp_with_conv"):
    peer.unet2d_config(config)


def test_same_weights_give_our_outputs():
  config = digits.get_config()
  params = random_params(config, 0)
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  t = np.array([0, 1, 500, 999], np.int32)
  ours = np.asarray(jax.jit(model_bundle.create_model(config).apply)({"params": params}, x, t))
  model = peer.build_model(config, params)
  assert not model.training
  with torch.inference_mode():
    theirs = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  assert np.abs(ours).mean() > 0.1
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)


def test_seed_params_are_our_initial_params_and_load():
  config = digits.get_config()
  params = peer.seed_params(config)
  flat = traverse_util.flatten_dict(params, sep="/")
  assert set(flat) == set(matching.variable_shapes(config))
  state_dict = peer.build_model(config, params).state_dict()
  np.testing.assert_array_equal(
    state_dict["conv_in.weight"].numpy(), flat["conv_in/kernel"].transpose(3, 2, 0, 1)
  )
  from ddpm_jax.training import program
  from ddpm_jax.training import state as state_lib

  state = jax.jit(
    lambda rng: program.init_train_state(
      config, model_bundle.create_model(config), state_lib.make_optimizer(config.optim), rng
    )
  )(jax.random.PRNGKey(config.training.seed))
  for path, value in traverse_util.flatten_dict(jax.device_get(state.params), sep="/").items():
    np.testing.assert_array_equal(flat[path], value, err_msg=path)


def check_result(result, unit):
  assert result["unit"] == unit
  assert math.isfinite(result["value"]) and result["value"] > 0
  settings = result["settings"]
  assert settings["threads"] == 1 and settings["precision"] == "float32"
  assert settings["torch"] == torch.__version__ and settings["num_params"] > 100_000
  json.dumps(result)
  return settings


def test_train_steps_per_s():
  result = peer.train_steps_per_s(digits.get_config(), batch=4, steps=2, warmup=1, threads=1)
  settings = check_result(result, "steps/s")
  assert (settings["batch"], settings["steps"], settings["warmup_steps"]) == (4, 2, 1)
  assert settings["images_per_s"] == pytest.approx(4 * result["value"])
  assert result["value"] == pytest.approx(2 / settings["seconds"])
  assert 0.1 < settings["final_loss"] < 10  # MSE of eps ~ N(0, 1) by a fresh model.
  assert settings["optimizer"]["lr"] == 1e-3 and settings["optimizer"]["ema_decay"] == 0.995


def test_forward_images_per_s():
  result = peer.forward_images_per_s(digits.get_config(), batch=4, iters=2, warmup=1, threads=1)
  settings = check_result(result, "images/s")
  assert result["value"] == pytest.approx(8 / settings["seconds"])
  assert settings["weights"] == "torch default init"


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_sample_images_per_s_extrapolates(sampler):
  config = digits.get_config()
  config.diffusion.num_timesteps = 10  # Ancestral sampling runs all T steps.
  result = peer.sample_images_per_s(config, 4, sampler, num_steps=10, timed_steps=2, threads=1)
  settings = check_result(result, "images/s")
  assert settings["extrapolated_from_steps"] == 2 and settings["steps"] == 2
  assert settings["num_steps"] == 10 and settings["batch"] == 4
  assert settings["chain_seconds"] == pytest.approx(5 * settings["seconds"])
  assert result["value"] == pytest.approx(4 / settings["chain_seconds"])
  assert settings["timesteps"] == [9, 0]
  assert settings["scheduler"] == {"ancestral": "DDPMScheduler", "ddim": "DDIMScheduler"}[sampler]


def test_full_ddim_chain_is_not_extrapolated_and_stays_in_range():
  config = digits.get_config()
  result = peer.sample_images_per_s(config, 2, "ddim", num_steps=4, threads=1)
  settings = check_result(result, "images/s")
  assert "extrapolated_from_steps" not in settings and settings["steps"] == 4
  assert settings["timesteps"] == [750, 0]
  assert settings["sample_abs_max"] <= 1.0 + 1e-5  # The last step returns the clipped x_0.
  with pytest.raises(ValueError, match="all 1000 steps"):
    peer.sample_images_per_s(config, 2, "ancestral", num_steps=4)


def run_cli(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "benchmarks.peer", *args],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_prints_one_json_line():
  done = run_cli(
    "sample",
    "--config=digits",
    "--num_images=2",
    "--sampler=ddim",
    "--num_steps=10",
    "--timed_steps=2",
    "--threads=1",
    "--seed_params",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.strip().splitlines()
  assert len(lines) == 1
  result = json.loads(lines[-1])
  assert result["workload"] == "sample" and result["unit"] == "images/s" and result["value"] > 0
  settings = result["settings"]
  assert settings["weights"] == "ours" and settings["config"] == "digits"
  assert settings["extrapolated_from_steps"] == 2 and settings["threads"] == 1

  done = run_cli("train", "--config=digits", "--batch=2", "--steps=1", "--warmup=0", "--threads=1")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["workload"] == "train" and result["unit"] == "steps/s" and result["value"] > 0
  assert result["settings"]["batch"] == 2


# diffusers' schedulers call np.array on torch tensors, which numpy 2 flags.
quiet_diffusers = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@quiet_diffusers
def test_dpm_solver_chain_settings_and_extrapolation():
  config = digits.get_config()
  result = peer.sample_images_per_s(config, 2, "dpm_solver", num_steps=20, timed_steps=2, threads=1)
  settings = check_result(result, "images/s")
  assert settings["scheduler"] == "DPMSolverMultistepScheduler"
  assert (settings["algorithm_type"], settings["solver_order"]) == ("dpmsolver++", 2)
  assert (settings["timestep_spacing"], settings["use_karras_sigmas"]) == ("linspace", False)
  assert settings["lower_order_final"] and settings["thresholding"]
  assert settings["sample_max_value"] == 1.0  # Thresholding at 1 is clipping x_0 to [-1, 1].
  assert settings["timesteps"] == [999, 50] and settings["num_steps"] == 20
  assert settings["chain_seconds"] == pytest.approx(10 * settings["seconds"])
  # The whole chain after the warm-up step: the scheduler starts afresh, its last step returns
  # the clipped x_0.
  result = peer.sample_images_per_s(config, 2, "dpm_solver", num_steps=4, threads=1)
  settings = check_result(result, "images/s")
  assert "extrapolated_from_steps" not in settings and settings["steps"] == 4
  assert settings["sample_abs_max"] <= 1.0 + 1e-5
  with pytest.raises(ValueError, match="needs num_steps"):
    peer.make_scheduler(config, "dpm_solver")
  # The command line's solver flags reach the scheduler.
  args = ["sample", "--config=digits", "--num_images=2", "--sampler=dpm_solver", "--num_steps=20"]
  args += ["--timed_steps=1", "--order=3", "--spacing=trailing", "--karras", "--threads=1"]
  settings = peer.run_workload(peer._parser().parse_args(args))["settings"]
  assert (settings["solver_order"], settings["timestep_spacing"]) == (3, "trailing")
  assert settings["use_karras_sigmas"] and settings["extrapolated_from_steps"] == 1


@quiet_diffusers
def test_both_sides_sample_the_same_images_from_the_same_x_T():
  """The two sides of `*_sample_dpm_solver20` are one computation: our `--mode=sample` sampler as
  `benchmarks.ours` builds it and the peer's timed diffusers loop, with the same weights (a
  network far from zero), end on the same images from the same x_T."""
  torch.set_num_threads(1)
  config = tiny_digits_config(**{"diffusion.num_timesteps": 1000})
  params = random_params(config, 0)
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(1), 4))
  shape = (4, *model_bundle.image_shape(config))
  spec = ours.sampler_spec("dpm_solver", 10)
  diffusion = model_bundle.create_diffusion(config)
  mesh = parallel.make_mesh()
  sample = samplers.make_sample_fn(
    diffusion, model_bundle.create_model(config), mesh, shape[1:], spec, len(keys)
  )
  images = sample(jax.device_put(params, parallel.replicated(mesh)), keys)
  x_T = np.array(diffusion_lib.draw_x_T(keys, shape)[0]).transpose(0, 3, 1, 2)
  theirs = peer.sample_from(config, torch.from_numpy(x_T), "dpm_solver", 10, params=params)
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  assert np.abs(images).mean() > 0.1 and np.abs(images).max() <= 1.0
  assert np.mean(np.abs(images) < 0.99) > 0.05  # Not every pixel clipped.
  # Measured 3e-5; order 3 or trailing spacing instead differ by 0.14-0.18.
  np.testing.assert_allclose(images, theirs, rtol=0, atol=1e-3)
