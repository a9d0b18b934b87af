"""The command line's edges: relative paths, config files and fields, workdirs; each user error is
one line with exit status 2, before anything is written."""

import os
import stat
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from ddpm_jax import file_io, main

TINY = [
  "--config.model.ch_mult=(1,)",
  "--config.model.attn_resolutions=()",
  "--config.model.num_res_blocks=1",
  "--config.diffusion.num_timesteps=20",
  "--config.training.batch_size=8",
  "--config.training.num_train_steps=2",
  "--config.training.checkpoint_every_steps=2",
  "--config.training.log_every=2",
  "--config.training.sample_every=0",
  "--config.training.fid_num_samples=0",
]


def run_main(args, cwd, data_dir=None, timeout=300):
  data = [f"--config.data.data_dir={data_dir}"] if data_dir else []
  return subprocess.run(
    [sys.executable, "-m", "ddpm_jax.main", *args, *data],
    env=subprocess_env(4),
    capture_output=True,
    text=True,
    cwd=cwd,
    timeout=timeout,
  )


def assert_one_line_error(result, *fragments):
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_absolute_keeps_remote_and_empty_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert file_io.absolute("run") == str(tmp_path / "run")
  assert file_io.absolute("a/../b") == str(tmp_path / "b")
  assert file_io.absolute("~/x") == os.path.join(os.path.expanduser("~"), "x")
  assert file_io.absolute("gs://bucket/run") == "gs://bucket/run"
  assert file_io.absolute("") == ""


def test_relative_workdir_trains_saves_and_samples(tmp_path, data_dir):
  """`cd DIR && main --workdir=run`: the checkpoint is saved (it was lost to "Checkpoint path
  should be absolute"), and --mode=sample finds it from the same relative path."""
  config = f"--config={REPO}/configs/digits.py"
  trained = run_main([config, "--workdir=run", *TINY], tmp_path, data_dir)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "Traceback" not in trained.stderr
  assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]
  sampled = run_main(
    [
      config,
      "--workdir=run",
      "--mode=sample",
      "--config.sample.num_samples=4",
      "--config.sample.batch_size=4",
      *TINY,
    ],
    tmp_path,
    data_dir,
  )
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  line = next(s for s in sampled.stdout.splitlines() if s.startswith("Samples: "))
  assert line.startswith(f"Samples: {tmp_path}/run/samples_step2_")
  assert os.path.isfile(os.path.join(line.removeprefix("Samples: "), "shard_00000.npz"))


def test_config_path_fields_are_made_absolute(tmp_path, monkeypatch):
  from configs import digits

  monkeypatch.chdir(tmp_path)
  config = digits.get_config()
  config.data.data_dir, config.eval.inception_weights = "tfds", "gs://b/inception.npz"
  config = main._with_absolute_paths(config)
  assert config.data.data_dir == str(tmp_path / "tfds")
  assert config.eval.inception_weights == "gs://b/inception.npz"
  assert config.eval.fid_stats_dir == ""  # Empty: the default cache, not the current directory.


@pytest.mark.parametrize(
  "args, fragments",
  [
    (["--config=configs/nonexistent.py"], ["--config=configs/nonexistent.py: no such file."]),
    (
      ["--config=configs/digits.py", "--config.training.bogus=3"],
      ["--config.training.bogus: no such config field ('bogus')", "configs/default.py"],
    ),
    (
      ["--config=configs/digits.py", "--config.nosection.x=3"],
      ["--config.nosection.x: no such config field ('nosection')"],
    ),
    (
      ["--config=configs/digits.py", "--config.training.batch_size=abc"],
      ["--config.training.batch_size=abc", "invalid literal for int()"],
    ),
    (
      ["--config=configs/digits.py", "--config.training.checkpoint_every_steps=-5"],
      ["config.training.checkpoint_every_steps=-5 is not allowed: it must be an integer >= 0"],
    ),
    (
      ["--config=configs/digits.py", "--config.training.checkpoint_every_secs=-1"],
      ["config.training.checkpoint_every_secs=-1 is not allowed: it must be a number >= 0"],
    ),
    (
      ["--config=configs/digits.py", "--config.training.fid_num_samples=-1"],
      ["config.training.fid_num_samples=-1 is not allowed"],
    ),
    (
      ["--config=configs/digits.py", "--config.optim.ema_decay=1.5"],
      ["config.optim.ema_decay=1.5 is not allowed: it must be in [0, 1)"],
    ),
  ],
)
def test_bad_config_files_and_fields_are_one_line(tmp_path, args, fragments):
  result = run_main([*args, f"--workdir={tmp_path / 'wd'}"], REPO)
  assert_one_line_error(result, *fragments)
  assert not os.path.exists(tmp_path / "wd")


def test_a_config_file_that_does_not_load_is_one_line(tmp_path):
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  (tmp_path / "not_a_config.py").write_text("def get_config():\n  return 3\n")
  result = run_main([f"--config={tmp_path / 'broken.py'}", f"--workdir={tmp_path}/wd"], REPO)
  assert_one_line_error(result, "broken.py could not be loaded: SyntaxError")
  result = run_main([f"--config={tmp_path / 'not_a_config.py'}", f"--workdir={tmp_path}/wd"], REPO)
  assert_one_line_error(result, "must return an ml_collections.ConfigDict")


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "file"
  path.write_text("not a directory")
  result = run_main(["--config=configs/digits.py", f"--workdir={path}"], REPO)
  assert_one_line_error(result, f"--workdir={path} is a file, not a directory")
  assert path.read_text() == "not a directory"


def test_a_read_only_workdir_is_one_line(tmp_path):
  workdir = tmp_path / "read_only"
  workdir.mkdir()
  workdir.chmod(stat.S_IRUSR | stat.S_IXUSR)
  if os.access(workdir, os.W_OK):  # root writes anywhere: use a file system that refuses it.
    workdir = "/sys/kernel"
  try:
    result = run_main(["--config=configs/digits.py", f"--workdir={workdir}"], REPO)
  finally:
    (tmp_path / "read_only").chmod(stat.S_IRWXU)
  assert_one_line_error(result, f"--workdir={workdir} cannot be written")
  assert os.listdir(tmp_path / "read_only") == []


def test_resuming_beyond_num_train_steps_is_one_line(tmp_path, data_dir):
  config = f"--config={REPO}/configs/digits.py"
  workdir = tmp_path / "wd"
  assert run_main([config, f"--workdir={workdir}", *TINY], REPO, data_dir).returncode == 0
  config_json = (workdir / "config.json").read_text()
  result = run_main(
    [config, f"--workdir={workdir}", *TINY, "--config.training.num_train_steps=1"], REPO, data_dir
  )
  assert_one_line_error(
    result,
    "is of step 2, beyond training.num_train_steps=1: nothing to train",
    "--config.training.num_train_steps=2",
  )
  assert (workdir / "config.json").read_text() == config_json  # Nothing was written.
