"""Training in subprocesses: SIGTERM (preemption) and two processes with jax.distributed."""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env
from test_training import assert_trees_close, restore


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def main_command(workdir, data_dir, num_steps, extra=()):
  return [
    sys.executable,
    "-m",
    "ddpm_jax.main",
    f"--config={REPO}/configs/digits.py",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    "--config.model.num_res_blocks=1",
    "--config.diffusion.num_timesteps=20",
    "--config.training.batch_size=8",
    f"--config.training.num_train_steps={num_steps}",
    "--config.training.log_every=2",
    "--config.training.checkpoint_every_steps=1000",
    "--config.training.checkpoint_every_secs=0",
    "--config.training.sample_every=0",
    "--config.training.fid_num_samples=0",
    "--config.optim.warmup_steps=2",
    "--config.data.num_shards=2",
    *extra,
  ]


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, data_dir):
  workdir = str(tmp_path / "wd")
  proc = subprocess.Popen(
    main_command(workdir, data_dir, 100_000),
    env=subprocess_env(4),
    stderr=subprocess.PIPE,
    text=True,
    cwd=REPO,
  )
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if re.search(r"\[4\] .*loss", line):
      break
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=120)
  assert proc.returncode == 0, "".join(lines) + rest
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert len(steps) == 1 and 4 <= steps[0] < 100_000
  resumed = subprocess.run(
    main_command(workdir, data_dir, steps[0] + 2),
    env=subprocess_env(4),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from the checkpoint of step {steps[0]}" in resumed.stderr
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [
    steps[0],
    steps[0] + 2,
  ]


# Adam turns float noise in near-zero gradients (the cross-process sum adds in another order)
# into +-lr steps; a large eps keeps the comparison about the gradients themselves.
ADAM_EPS = "--config.optim.eps=1e-3"


def run_two_processes(workdir, data_dir, num_steps):
  """Two processes x 2 devices through launch/local_multiprocess.py; returns their outputs."""
  main_args = main_command(workdir, data_dir, num_steps, [ADAM_EPS])[3:]
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "launch", "local_multiprocess.py"),
      "--num_processes=2",
      "--devices_per_process=2",
      "--",
      *main_args,
    ],
    env=subprocess_env(2),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
  )
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  return [
    "\n".join(line for line in output.splitlines() if line.startswith(f"[{i}]")) for i in range(2)
  ]


def test_two_processes_match_one_process(tmp_path, data_dir):
  multi_dir, single_dir = str(tmp_path / "multi"), str(tmp_path / "single")
  mixed_dir = str(tmp_path / "mixed")
  run_two_processes(multi_dir, data_dir, 3)
  shutil.copytree(multi_dir, mixed_dir)
  logs = run_two_processes(multi_dir, data_dir, 6)  # Resumes from step 3.
  assert "Resumed from the checkpoint of step 3" in logs[0]
  assert "Resumed from the checkpoint of step 3" in logs[1]
  single = subprocess.run(
    main_command(single_dir, data_dir, 6, [ADAM_EPS]),
    env=subprocess_env(4),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
  )
  assert single.returncode == 0, single.stderr[-3000:]
  # The two-process checkpoint of step 3 resumes in one process with 4 devices.
  mixed = subprocess.run(
    main_command(mixed_dir, data_dir, 6, [ADAM_EPS]),
    env=subprocess_env(4),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
  )
  assert mixed.returncode == 0, mixed.stderr[-3000:]
  assert "Resumed from the checkpoint of step 3" in mixed.stderr
  single_state = restore(single_dir, digits_cli_config(data_dir))
  for other_dir in (multi_dir, mixed_dir):
    state = restore(other_dir, digits_cli_config(data_dir))
    assert int(state.step) == int(single_state.step) == 6
    assert_trees_close(state.params, single_state.params, atol=1e-5)
    assert_trees_close(state.ema_params, single_state.ema_params, atol=1e-5)


def digits_cli_config(data_dir):
  from configs import digits

  config = digits.get_config()
  config.data.data_dir = data_dir
  config.model.num_res_blocks = 1
  config.diffusion.num_timesteps = 20
  config.data.num_shards = 2
  return config
