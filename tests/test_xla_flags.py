"""The XLA:CPU flags the product sets before JAX starts (ddpm_jax.xla_flags)."""

import os
import subprocess
import sys

from ddpm_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_adds_the_cpu_flags_after_the_users_own():
  assert xla_flags.with_cpu_flags("") == OURS
  assert xla_flags.with_cpu_flags(" --xla_force_host_platform_device_count=4 ") == (
    f"--xla_force_host_platform_device_count=4 {OURS}")


def test_keeps_a_value_the_user_set():
  mine = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution --xla_cpu_keep=1"
  assert xla_flags.with_cpu_flags(mine) == mine
  assert xla_flags.with_cpu_flags("--xla_cpu_experimental_ynn_fusion_type") == (
    "--xla_cpu_experimental_ynn_fusion_type")


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
from ddpm_jax import xla_flags
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
  proc = subprocess.run([sys.executable, "-c", _COUNT_KERNELS, mode], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=True)
  ynn, convolutions = proc.stdout.split()
  return int(ynn), int(convolutions)


def test_convolutions_leave_ynnpack_only_with_the_flags():
  # XLA's default runs each of the three convolutions (forward, input and kernel gradients) as a
  # YNNPACK fusion; with the flags, as XLA convolution thunks, outside any fusion.
  ynn_default, _ = _kernels("default")
  ynn_applied, convolutions = _kernels("apply")
  assert ynn_default >= 3
  assert ynn_applied == 0 and convolutions == 3
