"""Training end to end: the data-parallel step, main on mock data, resume, non-finite losses."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, read_scalars, subprocess_env, tiny_digits_config
from flax import traverse_util

from ddpm_jax import model_bundle, parallel
from ddpm_jax.checkpoints import checkpointer
from ddpm_jax.sampling import samplers
from ddpm_jax.training import loop as train_loop
from ddpm_jax.training import state as state_lib
from ddpm_jax.training import step as step_lib
from ddpm_jax.training.program import TrainProgram


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


MOCK_MAIN = """
import sys
import tensorflow_datasets as tfds
from absl import app
from ddpm_jax import main
with tfds.testing.mock_data(num_examples=32):
  app.run(main.main, argv=["ddpm_jax.main", *sys.argv[1:]])
"""


def run_main_on_mock_data(args: list[str]) -> subprocess.CompletedProcess:
  """Runs ddpm_jax.main's `main` with ARGS in a fresh process, TFDS mocked to random data."""
  return subprocess.run(
    [sys.executable, "-c", MOCK_MAIN, *args],
    env=subprocess_env(4),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
  )


def restore(workdir, config):
  loop = train_loop.TrainLoop(config, workdir)
  ckpt = checkpointer.Checkpointer(os.path.join(workdir, "checkpoints"), keep=10, every_steps=0)
  with ckpt:
    return ckpt.restore(checkpointer.abstract_state(loop.init_fn, parallel.replicated(loop.mesh)))


def assert_trees_close(a, b, atol):
  for (path, x), y in zip(
    traverse_util.flatten_dict(a).items(), traverse_util.flatten_dict(b).values(), strict=True
  ):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, err_msg=str(path))


# -- The data-parallel step. -------------------------------------------------------------------


def test_sharded_gradient_is_the_gradient_of_the_global_mean_loss():
  """4 devices give the same loss and update as 1 device: no double pmean, no missing sum."""
  config = tiny_digits_config(**{"model.dropout": 0.0})
  model, diffusion = model_bundle.create_model(config), model_bundle.create_diffusion(config)
  x = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 1), minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x[:1], jnp.zeros((1,), jnp.int32))["params"]
  params = jax.tree.map(
    lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params
  )
  results = []
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    state = state_lib.create_train_state(
      jax.tree.map(jnp.copy, params), optax.sgd(1.0), jax.random.PRNGKey(3)
    )
    step_fn = step_lib.make_train_step(
      diffusion=diffusion,
      model=model,
      optimizer=optax.sgd(1.0),
      lr_schedule=lambda s: 1.0,
      ema_decay=0.5,
      global_batch_size=8,
    )
    step = step_lib.shard_train_step(step_fn, mesh)
    new, metrics = step(
      jax.device_put(state, parallel.replicated(mesh)),
      jax.device_put(x, parallel.batch_sharding(mesh)),
    )
    results.append((jax.device_get(new), jax.device_get(metrics)))
  (one, m1), (four, m4) = results
  assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
  assert float(m4["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
  assert_trees_close(four.params, one.params, atol=1e-5)
  # The update is the full gradient (sgd with lr 1), and the EMA moved half way.
  delta = jax.tree.map(lambda a, b: a - b, params, four.params)
  assert float(optax.tree.norm(delta)) == pytest.approx(float(m4["grad_norm"]), rel=1e-4)
  half = jax.tree.map(lambda a, b: 0.5 * (a + b), params, four.params)
  assert_trees_close(four.ema_params, half, atol=1e-5)


def test_state_buffers_are_distinct_for_donation():
  config = tiny_digits_config()
  loop = train_loop.TrainLoop(config, "/tmp/unused")
  state = loop.init_fn()
  pointers = [
    x.addressable_shards[0].data.unsafe_buffer_pointer()
    for x in jax.tree.leaves(state)
    if x.size > 1
  ]
  assert len(pointers) == len(set(pointers))


def test_steps_per_call_matches_single_steps():
  # A large Adam eps keeps Adam from turning float noise in near-zero gradients into +-lr.
  config = tiny_digits_config(**{"optim.eps": 1e-3})
  loop = train_loop.TrainLoop(config, "/tmp/unused")
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 8, 1), minval=-1, maxval=1)
  state = loop.init_fn()
  for i in range(3):
    state, _ = loop.train_step(1)(state, jax.device_put(x[i], parallel.batch_sharding(loop.mesh)))
  multi, metrics = loop.train_step(3)(
    loop.init_fn(), jax.device_put(x, parallel.batch_sharding(loop.mesh, 3))
  )
  assert int(multi.step) == 3 and bool(metrics["finite"])
  assert_trees_close(multi.params, state.params, atol=1e-6)
  assert_trees_close(multi.ema_params, state.ema_params, atol=1e-6)


# -- The main job. -----------------------------------------------------------------------------


def test_main_end_to_end_on_mock_cifar10(tmp_path):
  workdir = str(tmp_path / "wd")
  overrides = [
    "--config.model.ch=32",
    "--config.model.ch_mult=(1,2)",
    "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=(16,)",
    "--config.diffusion.num_timesteps=10",
    "--config.training.batch_size=8",
    "--config.training.num_train_steps=4",
    "--config.training.log_every=2",
    "--config.training.checkpoint_every_steps=2",
    "--config.training.sample_every=4",
    "--config.training.num_sample_images=4",
    "--config.data.shuffle_buffer=16",
  ]
  result = run_main_on_mock_data(
    [f"--config={REPO}/configs/cifar10.py", f"--workdir={workdir}", *overrides]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  png = os.path.join(workdir, "samples", "step_00000004.png")
  from PIL import Image

  image = np.asarray(Image.open(png))
  # A 2x2 grid of 32x32 images with 2-pixel padding, upscaled 2x for viewing.
  assert image.shape == (2 * (2 + 2 * 34), 2 * (2 + 2 * 34), 3) and image.std() > 0
  assert os.path.exists(os.path.join(workdir, "config.json"))
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  assert events
  scalars = read_scalars(workdir)
  assert set(scalars) >= {
    "loss",
    "grad_norm",
    "param_norm",
    "lr",
    "steps_per_sec",
    "images_per_sec",
  }
  assert [s for s, _ in scalars["loss"]] == [2, 4]
  assert all(np.isfinite(v) and v > 0 for _, v in scalars["loss"])
  # lr warms up linearly over 5000 steps from 0: lr(step 3) = 2e-4 * 3 / 5000.
  assert dict(scalars["lr"])[4] == pytest.approx(2e-4 * 3 / 5000, rel=1e-5)


def test_resume_equals_uninterrupted_run(tmp_path, data_dir):
  config = tiny_digits_config(
    **{
      "data.data_dir": data_dir,
      "training.num_train_steps": 8,
      "training.checkpoint_every_steps": 100,
    }
  )
  full = train_loop.train_and_evaluate(config, str(tmp_path / "full"))
  half = tiny_digits_config(
    **{
      "data.data_dir": data_dir,
      "training.num_train_steps": 4,
      "training.checkpoint_every_steps": 100,
    }
  )
  resumed_dir = str(tmp_path / "resumed")
  first = train_loop.train_and_evaluate(half, resumed_dir)
  assert int(first.step) == 4
  resumed = train_loop.train_and_evaluate(config, resumed_dir)
  assert int(resumed.step) == 8
  assert_trees_close(resumed.params, full.params, atol=1e-6)
  assert_trees_close(resumed.ema_params, full.ema_params, atol=1e-6)
  # The two halves differ from each other, so equality above is not trivial.
  assert not np.allclose(jax.tree.leaves(first.params)[0], jax.tree.leaves(full.params)[0])


def test_training_ends_with_samples_and_their_sample_quality(tmp_path, data_dir, capsys):
  config = tiny_digits_config(
    **{
      "data.data_dir": data_dir,
      "training.num_train_steps": 2,
      "training.sample_every": 2,
      "training.num_sample_images": 4,
      "training.fid_num_samples": 40,
    }
  )
  train_loop.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  match = re.search(
    r"Sample quality of 40 EMA samples at step 2 \(digits, against its train "
    r"split\): fid ([0-9.e+]+), num_samples 40, inception_score ([0-9.e+]+)",
    out,
  )
  assert match, out
  # Two training steps give noise, far from the digits, and a weak IS (at most 10 classes).
  assert float(match.group(1)) > 10 and 1 <= float(match.group(2)) < 10
  assert f"EMA samples: {tmp_path}/samples/step_00000002.png" in out
  scalars = read_scalars(str(tmp_path))
  assert scalars["sample_quality/fid"][0][1] == pytest.approx(float(match.group(1)), rel=1e-3)


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / "wd")
  config = tiny_digits_config(**{"data.data_dir": data_dir, "training.num_train_steps": 3})
  train_loop.train_and_evaluate(config, workdir)
  bad = tiny_digits_config(
    **{
      "data.data_dir": data_dir,
      "training.num_train_steps": 12,
      "training.checkpoint_every_steps": 1,
      "training.log_every": 1,
      "optim.lr": 1e35,
      "optim.grad_clip": 0.0,
    }
  )
  with pytest.raises(
    train_loop.NonFiniteLossError, match="latest checkpoint in the workdir is intact"
  ):
    train_loop.train_and_evaluate(bad, workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  state = restore(workdir, config)
  assert checkpointer.is_finite(state)
  assert steps[0] == 3 and all(
    checkpointer.is_finite(restore_step(workdir, config, s)) for s in steps
  )


def restore_step(workdir, config, step):
  loop = train_loop.TrainLoop(config, workdir)
  with checkpointer.Checkpointer(
    os.path.join(workdir, "checkpoints"), keep=10, every_steps=0
  ) as ckpt:
    return ckpt.restore(
      checkpointer.abstract_state(loop.init_fn, parallel.replicated(loop.mesh)), step
    )


def test_parameter_count_of_the_digits_default():
  from configs import digits

  config = digits.get_config()
  model = model_bundle.create_model(config)
  shapes = jax.eval_shape(
    model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
  )
  assert parallel.param_count(shapes["params"]) == 1_001_729


def test_bfloat16_compute_keeps_float32_state_and_loss_within_one_percent():
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_digits_config(**{"model.dtype": dtype, "model.dropout": 0.0})
    loop = train_loop.TrainLoop(config, "/tmp/unused")
    state = loop.init_fn()
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} <= {
      jnp.dtype("float32"),
      jnp.dtype("int32"),
    }
    params = jax.tree.map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), state.params
    )
    x = jax.random.uniform(jax.random.PRNGKey(0), (64, 8, 8, 1), minval=-1, maxval=1)
    t = jnp.arange(64, dtype=jnp.int32) * 20 % config.diffusion.num_timesteps
    noise = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    model_fn = lambda x, t, p=params, m=loop.model: m.apply({"params": p}, x, t, train=False)
    loss = loop.diffusion.training_losses(model_fn, x, t, noise)
    assert loss.dtype == jnp.float32
    losses[dtype] = float(jnp.mean(loss))
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.01)
  assert losses["bfloat16"] != losses["float32"]  # bfloat16 really was used.


def test_labels_reach_the_loss_a_tiny_model_learns_two_classes():
  """Class 0 is dark images, class 1 bright ones: after a short training the conditional samples
  of each class are dark or bright, and near x_T the model's x_0 fits the right label, not the
  wrong one, with the null class (which label dropout trained too) in between."""
  config = tiny_digits_config(**{
    "model.num_classes": 2, "model.dropout": 0.0, "training.label_dropout": 0.2,
    "optim.lr": 3e-3, "optim.warmup_steps": 5, "optim.ema_decay": 0.9,
    # x_0 prediction, and x_T pure noise with T = 20: only the label tells the classes apart.
    "diffusion.beta_schedule": "cosine", "diffusion.model_mean_type": "xstart"})  # fmt: skip
  program = TrainProgram(config)
  labels = np.arange(8, dtype=np.int32) % 2
  images = np.where(labels[:, None, None, None] == 1, 0.8, -0.8) * np.ones((8, 8, 8, 1))
  batch = (
    parallel.global_batch(images.astype(np.float32), program.mesh),
    parallel.global_batch(labels, program.mesh),
  )
  state = program.init_fn()
  for _ in range(150):
    state, metrics = program.train_step(1)(state, batch)
  assert float(metrics["loss"]) < 0.5
  sample = samplers.make_sampler(program.diffusion, program.model, program.mesh, (8, 8, 1))
  keys = samplers.sample_keys(jax.random.PRNGKey(0), 0, 8)
  means = {
    name: sample(state.ema_params, keys, y).mean(axis=(1, 2, 3))
    for name, y in (("dark", np.zeros(8, np.int32)), ("bright", np.ones(8, np.int32)))
  }
  assert np.all(means["dark"] < -0.6) and np.all(means["bright"] > 0.6), means
  x0, noise = (
    jnp.asarray(images, jnp.float32),
    jax.random.normal(jax.random.PRNGKey(3), (8, 8, 8, 1)),
  )
  t = jnp.full((8,), 15, jnp.int32)
  losses = {}
  for name, y in (("right", labels), ("wrong", 1 - labels), ("null", np.full(8, 2, np.int32))):
    model_fn = lambda x, t, y=y: program.model.apply(
      {"params": state.ema_params}, x, t, y=jnp.asarray(y)
    )
    losses[name] = float(program.diffusion.training_losses(model_fn, x0, t, noise).mean())
  assert 5 * losses["right"] < losses["null"] < losses["wrong"] / 2, losses
