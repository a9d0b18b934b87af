"""--mode=eval: bits/dim and sample quality of each checkpoint, and the watching evaluator."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, read_scalars, subprocess_env, tiny_digits_config

from ddpm_jax.evaluation import evaluate
from ddpm_jax.training import loop as train_loop

EVAL = {
  "model.ch_mult": (1,),
  "model.attn_resolutions": (),
  "training.num_train_steps": 4,
  "training.checkpoint_every_steps": 2,
  "eval.num_examples": 16,
  "eval.batch_size": 8,
  "sample.num_samples": 24,
  "sample.batch_size": 8,
  "sample.num_steps": 20,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  config = tiny_digits_config(
    **EVAL, **{"data.data_dir": str(root / "tfds"), "eval.fid_stats_dir": str(root / "stats")}
  )
  workdir = str(root / "wd")
  train_loop.train_and_evaluate(config, workdir)
  return config, workdir


def test_watch_evaluates_every_checkpoint_once(run, monkeypatch):
  config, workdir = run
  assert evaluate.watch(config, workdir, poll_secs=0.1, timeout_secs=600) == [2, 4]
  for step in (2, 4):
    with open(os.path.join(workdir, f"eval_{step}", "bpd.json")) as f:
      bpd = json.load(f)
    assert bpd["n"] == 16 and bpd["mean"] > 0
    (samples,) = glob.glob(os.path.join(workdir, f"samples_step{step}_ancestral_20steps_seed1_*"))
    with open(os.path.join(samples, "sample_quality.json")) as f:
      quality = json.load(f)
    assert quality["num_samples"] == 24 and quality["fid"] > 0
  scalars = read_scalars(os.path.join(workdir, "eval"))
  assert [s for s, _ in scalars["eval/fid"]] == [2, 4]
  assert [s for s, _ in scalars["eval/bpd"]] == [2, 4]
  # The two checkpoints differ, and so do their numbers.
  assert scalars["eval/bpd"][0][1] != scalars["eval/bpd"][1][1]
  # A rerun finds everything done and evaluates nothing.
  monkeypatch.setattr(evaluate, "run_eval", lambda *a: pytest.fail("evaluated again"))
  assert evaluate.watch(config, workdir, poll_secs=0.1) == [2, 4]


def test_main_eval_mode_prints_the_numbers(run, tmp_path):
  config, workdir = run
  args = [f"--config.{k}={v}" for k, v in EVAL.items() if k != "model.attn_resolutions"]
  args += [
    "--config.model.attn_resolutions=()",
    "--config.model.num_res_blocks=1",
    "--config.diffusion.num_timesteps=20",
    "--config.training.batch_size=8",
    f"--config.data.data_dir={config.data.data_dir}",
    f"--config.eval.fid_stats_dir={config.eval.fid_stats_dir}",
    "--config.sample.checkpoint_step=2",
    "--config.sample.seed=5",
  ]
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "ddpm_jax.main",
      f"--config={REPO}/configs/digits.py",
      f"--workdir={workdir}",
      "--mode=eval",
      *args,
    ],
    env=subprocess_env(4),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Sample quality (24 samples in" in result.stdout
  assert re.search(r"samples_step2_ancestral_20steps_seed5_[0-9a-f]{8}\b", result.stdout)
  assert "eval/fid" in result.stdout
