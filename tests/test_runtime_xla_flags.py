"""The XLA:CPU flags the product sets before JAX starts (ddpm_jax.runtime.xla_flags)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config

from ddpm_jax import model_bundle, parallel
from ddpm_jax.evaluation import bpd
from ddpm_jax.runtime import xla_flags
from ddpm_jax.sampling import samplers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_adds_the_cpu_flags_after_the_users_own():
  assert xla_flags.with_cpu_flags("") == OURS
  assert xla_flags.with_cpu_flags(" --xla_force_host_platform_device_count=4 ") == (
    f"--xla_force_host_platform_device_count=4 {OURS}"
  )


def test_keeps_a_value_the_user_set():
  mine = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution --xla_cpu_keep=1"
  assert xla_flags.with_cpu_flags(mine) == mine
  assert xla_flags.with_cpu_flags("--xla_cpu_experimental_ynn_fusion_type") == (
    "--xla_cpu_experimental_ynn_fusion_type"
  )


def test_apply_sets_the_environment_once():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "OTHER": "x"}
  first = xla_flags.apply(environ)
  assert xla_flags.apply(environ) == first == environ["XLA_FLAGS"]
  assert first == f"--xla_force_host_platform_device_count=2 {OURS}"
  assert environ["OTHER"] == "x"
  assert xla_flags.apply({}) == OURS


# Compiles a 3x3 convolution and its gradients; prints how many YNNPACK fusions and XLA
# convolution thunks the CPU program has.
_COUNT_KERNELS = """
import sys
import jax, jax.numpy as jnp
from ddpm_jax.runtime import xla_flags
if sys.argv[1] == "apply":
  xla_flags.apply()
conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
step = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1)))
text = step.lower(jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
lines = text.splitlines()
print(sum("__ynn_fusion" in line for line in lines), sum(" convolution(" in line for line in lines))
"""


def _kernels(mode: str) -> tuple[int, int]:
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-c", _COUNT_KERNELS, mode],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  ynn, convolutions = proc.stdout.split()
  return int(ynn), int(convolutions)


def test_convolutions_leave_ynnpack_only_with_the_flags():
  # XLA's default runs each of the three convolutions (forward, input and kernel gradients) as a
  # YNNPACK fusion; with the flags, as XLA convolution thunks, outside any fusion.
  ynn_default, _ = _kernels("default")
  ynn_applied, convolutions = _kernels("apply")
  assert ynn_default >= 3
  assert ynn_applied == 0 and convolutions == 3


YNN = xla_flags.YNN_FUSION_TYPE


def test_inference_options_on_cpu_under_our_setting_only():
  inference = {YNN: xla_flags.INFERENCE_YNN_FUSION_TYPES}
  for flags in (OURS, "", "--xla_force_host_platform_device_count=4"):
    assert xla_flags.inference_compiler_options("cpu", flags) == inference
  assert xla_flags.inference_compiler_options("gpu", OURS) == {}
  assert xla_flags.inference_compiler_options("tpu", "") == {}
  for mine in (f"--{YNN}=+individual_convolution", f"--{YNN}=", f"--{YNN}"):
    assert xla_flags.inference_compiler_options("cpu", mine) == {}  # The user's choice holds.


def test_inference_options_keep_reductions_out_of_ynnpack():
  # A convolution followed by per-channel means (GroupNorm's statistics): under the train step's
  # flags the reduction is a YNNPACK fusion, with the inference options an XLA loop.
  def forward(x, k):
    h = jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return h - jnp.mean(h, axis=(1, 2), keepdims=True)

  def ynn_fusions(options):
    text = (
      jax.jit(forward, compiler_options=options)
      .lower(jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32)))
      .compile()
      .as_text()
    )
    return sum("__ynn_fusion" in line for line in text.splitlines())

  assert ynn_fusions(None) >= 1
  assert ynn_fusions(xla_flags.inference_compiler_options("cpu")) == 0


def test_samplers_and_likelihood_compile_with_the_inference_options(monkeypatch):
  """make_sampler and make_bpd_fn pass inference_compiler_options(their devices' platform) to
  the compiler: an invalid option put there fails their compilation."""
  config = tiny_digits_config(**{"model.ch_mult": (1,), "model.attn_resolutions": ()})
  diffusion, model = model_bundle.create_diffusion(config), model_bundle.create_model(config)
  mesh = parallel.make_mesh()
  params = jax.device_put(
    jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)),
    parallel.replicated(mesh),
  )["params"]
  keys = samplers.sample_keys(jax.random.PRNGKey(0), 0, 4)
  platforms = []

  def invalid(platform, xla_flags=None):
    platforms.append(platform)
    return {YNN: "NOT_A_FUSION_TYPE"}

  assert samplers.make_sampler(diffusion, model, mesh, (8, 8, 1))(params, keys).shape == (
    4,
    8,
    8,
    1,
  )
  monkeypatch.setattr(xla_flags, "inference_compiler_options", invalid)
  sample = samplers.make_sampler(diffusion, model, mesh, (8, 8, 1))
  bpd_fn = bpd.make_bpd_fn(diffusion, model, mesh, jax.random.PRNGKey(0))
  with pytest.raises(Exception, match="NOT_A_FUSION_TYPE"):
    sample(params, keys)
  with pytest.raises(Exception, match="NOT_A_FUSION_TYPE"):
    bpd_fn(params, np.zeros((4, 8, 8, 1), np.float32), np.arange(4), np.ones(4, bool))
  assert platforms == ["cpu", "cpu"]
