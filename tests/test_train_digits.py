"""The README's first command, `./train_digits.sh`, as a user runs it: its own command line and its
relative default workdir (`workdir_digits`), only the step counts made tiny."""

import os
import shutil
import subprocess
import sys

from conftest import REPO, subprocess_env

TINY_STEPS = [
  "--config.diffusion.num_timesteps=20",
  "--config.training.log_every=2",
  "--config.training.checkpoint_every_steps=2",
  "--config.training.sample_every=4",
  "--config.training.num_sample_images=4",
  "--config.training.fid_num_samples=20",
]


def _copy_of_the_repository(dest) -> str:
  """The repository's files (a clean clone's: tracked and new, mtimes kept), and a stand-in venv
  that is this interpreter, so that `scripts/ensure_venv.sh` finds it installed and installs
  nothing."""
  files = subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  for name in filter(lambda name: os.path.isfile(os.path.join(REPO, name)), files):
    os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
    shutil.copy2(os.path.join(REPO, name), os.path.join(dest, name))
  venv_bin = os.path.join(dest, "venv", "bin")
  os.makedirs(venv_bin)
  with open(os.path.join(venv_bin, "python"), "w") as f:
    f.write(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  os.chmod(os.path.join(venv_bin, "python"), 0o755)
  with open(os.path.join(dest, "venv", ".ddpm_jax-installed"), "w") as f:  # Newer than setup.py.
    f.write(os.environ.get("DDPM_JAX_EXTRAS", "cpu,test") + "\n")
  return os.path.join(dest, "venv")


def run_script(repo, venv, args, script="./train_digits.sh", **env):
  env = dict(subprocess_env(4), DDPM_JAX_VENV=venv, **env)
  result = subprocess.run(
    [script, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900
  )
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  assert "Traceback" not in output, output[-3000:]  # Background threads included.
  return result


def test_train_digits_saves_samples_and_resumes(tmp_path):
  repo = str(tmp_path / "repo")
  venv = _copy_of_the_repository(repo)
  workdir = os.path.join(repo, "workdir_digits")
  first = run_script(repo, venv, ["--config.training.num_train_steps=4", *TINY_STEPS])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  grid = os.path.join(workdir, "samples", "step_00000004.png")
  assert f"Trained to step 4. EMA samples: {grid}" in first.stdout and os.path.isfile(grid)
  assert "Sample quality of 20 EMA samples at step 4" in first.stdout

  second = run_script(repo, venv, ["--config.training.num_train_steps=6", *TINY_STEPS])
  assert "Resumed from the checkpoint of step 4" in second.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
  assert "Trained to step 6." in second.stdout


def test_train_digits_conditional_trains_then_sweeps_the_guidance_scale(tmp_path):
  repo = str(tmp_path / "repo")
  venv = _copy_of_the_repository(repo)
  workdir = os.path.join(repo, "workdir_digits_conditional")
  sweep = "--num_samples=10 --seeds=1 --guidance_scales=0,2"
  steps = ["--config.training.num_train_steps=2", "--config.sample.num_steps=3", *TINY_STEPS]
  result = run_script(repo, venv, steps, "./train_digits_conditional.sh", SWEEP_FLAGS=sweep)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert "Trained to step 2." in result.stdout
  # The sweep's table: one row per scale, with the class accuracy of the conditional model.
  with open(os.path.join(workdir, "guidance_sweep", "table.md")) as f:
    table = f.read().splitlines()
  assert [row.split("|")[2].strip() for row in table[2:]] == ["0", "2"]
  assert all(row.rstrip(" |").split("|")[-2].strip().endswith("%") for row in table[2:])
  assert table[2] in result.stdout
