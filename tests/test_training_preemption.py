"""SIGTERM once the last checkpoint is saved: the final sampling is cut short, exit status 0."""

import os
import re
import signal
import subprocess
import sys
import time

from conftest import REPO, subprocess_env
from test_main import TINY

PROGRESS = re.compile(r"Sampling 256 EMA images of step 2: (\d+) of 1000 reverse steps, (\d+) s")


def test_sigterm_during_the_final_sampling_exits_at_once_and_a_rerun_finishes(tmp_path):
  workdir = tmp_path / "wd"
  args = [
    sys.executable,
    "-m",
    "ddpm_jax.main",
    f"--config={REPO}/configs/digits.py",
    f"--workdir={workdir}",
    f"--config.data.data_dir={tmp_path / 'tfds'}",
    *TINY,
    "--config.training.sample_every=2",
    "--config.training.num_sample_images=256",
  ]
  proc = subprocess.Popen(
    [*args, "--config.diffusion.num_timesteps=1000"],
    cwd=REPO,
    env=subprocess_env(4),
    stderr=subprocess.PIPE,
    text=True,
  )
  lines = []
  try:
    for line in proc.stderr:  # The chain logs its progress (and ETA) as it goes.
      lines.append(line)
      if match := PROGRESS.search(line):
        break
    else:
      raise AssertionError("no sampling progress was logged:\n" + "".join(lines[-30:]))
    first_report = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[1]
    exit_secs = time.monotonic() - first_report
  finally:
    proc.kill()
  stderr = "".join(lines) + rest
  assert proc.returncode == 0, stderr[-3000:]
  assert (
    "SIGTERM received after the last checkpoint was saved: skipping the EMA samples of "
    "step 2; exiting."
  ) in stderr
  assert "Traceback" not in stderr
  # It did not wait for the chain: at its own pace the rest would take 9x the first tenth.
  steps, secs = int(match.group(1)), max(int(match.group(2)), 1)
  assert steps == 100 and exit_secs < min(30, 9 * secs / 2), (exit_secs, secs)
  assert os.listdir(workdir / "checkpoints") == ["2"]
  grid = workdir / "samples" / "step_00000002.png"
  assert not grid.exists()

  # Rerunning the same command (a shorter chain here) finds the run trained and samples.
  rerun = subprocess.run(
    [*args, "--config.diffusion.num_timesteps=20"],
    cwd=REPO,
    env=subprocess_env(4),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Already trained to step 2." in rerun.stdout
  assert f"EMA samples: {grid}" in rerun.stdout and grid.exists()
  assert os.listdir(workdir / "checkpoints") == ["2"]
