"""Config validation: every mode checks the fields it reads before compiling; each problem is one
message naming the field, its value and what is allowed."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env, tiny_digits_config

from ddpm_jax.config.validation import ConfigError, validate_config


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"training.batch_size": 6}, r"training.batch_size=6 .*divide evenly over the 4 devices"),
    ({"data.image_size": 9}, r"data.image_size=9 .*halves it 1 times.*multiple of 2"),
    (
      {"diffusion.beta_schedule": "sigmoid"},
      r"diffusion.beta_schedule='sigmoid'.*allowed values are linear, quad",
    ),
    ({"diffusion.loss_type": "l1"}, r"diffusion.loss_type='l1'.*mse, kl, hybrid"),
    ({"diffusion.model_mean_type": "v"}, r"diffusion.model_mean_type='v'.*eps, xstart"),
    (
      {"diffusion.model_var_type": "learned"},
      r"config.diffusion: loss_type 'mse' cannot train model_var_type 'learned'",
    ),
    ({"data.dataset": "imagenet"}, r"data.dataset='imagenet'.*cifar10, celeb_a_hq"),
    ({"model.ch": 48}, r"model.ch=48 .*multiple of 32"),
    ({"model.attn_resolutions": (16,)}, r"model.attn_resolutions=\(16,\).*\[4, 8\]"),
    ({"training.steps_per_call": 3}, r"training.log_every=2 .*steps_per_call=3"),
    ({"model.dtype": "float16"}, r"model.dtype='float16'.*float32, bfloat16"),
    ({"data.num_shards": 3}, r"data.num_shards=3 .*divides training.batch_size=8"),
  ],
)
def test_bad_configs_name_field_value_and_allowed(overrides, match):
  with pytest.raises(ConfigError, match=match):
    validate_config(tiny_digits_config(**overrides), device_count=4)


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"sample.sampler": "plms"}, r"sample.sampler='plms'.*ancestral, ddim, dpm_solver, heun"),
    ({"sample.sampler": "ddim", "sample.num_steps": 21}, r"sample.num_steps=21 .*T=20"),
    ({"sample.sampler": "dpm_solver", "sample.order": 4}, r"sample.order=4 .*1, 2, 3"),
    ({"sample.sampler": "heun", "sample.spacing": "leading"}, r"sample.spacing='leading'"),
    (
      {"sample.sampler": "dpm_solver", "sample.num_steps": 20},
      r"config.sample \(dpm_solver, num_steps=20\): spacing 'linspace' with num_steps=20 "
      r"repeats timesteps of the T=20 steps",
    ),
    (
      {"sample.sampler": "heun", "sample.num_steps": 5, "diffusion.model_mean_type": "xprev"},
      r"sample.sampler='heun' .*diffusion.model_mean_type='xprev'",
    ),
    (
      {"sample.sampler": "heun", "sample.num_steps": 5, "diffusion.beta_schedule": "jsd"},
      r"config.sample \(heun, num_steps=5\): The ODE solvers need abar_t > 0",
    ),
    ({"sample.eta": -0.5, "sample.sampler": "ddim", "sample.num_steps": 5}, r"sample.eta=-0.5"),
  ],
)
def test_bad_sampler_settings_name_field_value_and_allowed(overrides, match):
  with pytest.raises(ConfigError, match=match):
    validate_config(tiny_digits_config(**overrides), mode="sample")
  validate_config(tiny_digits_config(**overrides), mode="train", device_count=4)  # Not read.


def test_the_fast_samplers_validate():
  for sampler, steps in (("dpm_solver", 19), ("heun", 20), ("ddim", 20)):
    validate_config(
      tiny_digits_config(**{"sample.sampler": sampler, "sample.num_steps": steps}), mode="sample"
    )


def test_the_shipped_configs_are_valid():
  import importlib

  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f[0] != "_")
  assert {"default", "cifar10", "digits", "lsun_church", "cifar10_conditional"} <= set(names)
  for name in names:
    config = importlib.import_module(f"configs.{name}").get_config()
    validate_config(config, device_count=4)


def test_main_reports_a_bad_config_in_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "ddpm_jax.main",
      f"--config={REPO}/configs/digits.py",
      f"--workdir={tmp_path}",
      "--config.training.batch_size=6",
    ],
    env=subprocess_env(4),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert result.returncode == 2
  assert "error: config.training.batch_size=6 is not allowed" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_main_reports_a_missing_dataset(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "ddpm_jax.main",
      f"--config={REPO}/configs/cifar10.py",
      f"--workdir={tmp_path / 'wd'}",
      f"--config.data.data_dir={tmp_path / 'nodata'}",
    ],
    env=subprocess_env(4),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert "cifar10" in result.stderr and "download_and_prepare" in result.stderr
  assert "Traceback" not in result.stderr
