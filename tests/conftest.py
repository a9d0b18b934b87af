"""Test setup: 4 simulated CPU devices, the product's XLA:CPU flags, quiet TensorFlow, and tiny
configs."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ddpm_jax.runtime import xla_flags  # noqa: E402

xla_flags.apply()  # The XLA:CPU settings `ddpm_jax.main` runs with.

import pytest  # noqa: E402

from configs import digits  # noqa: E402
from ddpm_jax.runtime import compilation_cache  # noqa: E402

# The slowest files first: under `--dist loadfile --no-loadscope-reorder` (run_tests.sh) the
# workers take whole files in collection order, so these start at once, one per worker, instead
# of one of them ending the run alone while the other worker idles.
SLOW_FILES_FIRST = (
  "test_training.py",
  "test_training_multiprocess.py",
  "test_train_digits.py",
  "test_training_preemption.py",
  "test_evaluation_sweeps.py",
  "test_notebooks.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files stay whole.


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache, one per worker for the session: the many tests that
  train or sample the same tiny configs compile each program once."""
  compilation_cache.enable(str(tmp_path_factory.getbasetemp() / "jax_cache"), min_compile_secs=0.2)


def tiny_digits_config(**overrides):
  """The digits config with a ~60k-parameter U-Net and short schedules."""
  config = digits.get_config()
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.training.batch_size = 8
  config.training.num_train_steps = 6
  config.training.log_every = 2
  config.training.checkpoint_every_steps = 3
  config.training.checkpoint_every_secs = 0
  config.training.sample_every = 0
  config.training.num_sample_images = 4
  config.training.fid_num_samples = 0  # No end-of-training FID unless a test asks for it.
  config.optim.warmup_steps = 2
  config.diffusion.num_timesteps = 20
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.fixture
def tiny_config():
  return tiny_digits_config


def subprocess_env(devices):
  """The environment of a subprocess with `devices` simulated CPU devices, importing this
  checkout."""
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO,
  )
  return env


def read_scalars(workdir):
  """TensorBoard scalars of `workdir`: {tag: [(step, value)]}."""
  import tensorflow as tf
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    values = [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
    if all(v.ndim == 0 for _, v in values):
      out[tag] = [(step, float(v)) for step, v in values]
  return out
