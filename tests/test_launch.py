"""The launch scripts: the TPU pod script's commands, the SLURM script, the local launcher."""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TPU_POD = REPO / "launch" / "tpu_pod.sh"
SBATCH = REPO / "launch" / "slurm_gpu.sbatch"
LAUNCHER = REPO / "launch" / "local_multiprocess.py"


def write_executable(path: Path, text: str) -> Path:
  path.write_text(textwrap.dedent(text).lstrip())
  path.chmod(0o755)
  return path


# -- shellcheck ---------------------------------------------------------------------------------


@pytest.mark.skipif(
  shutil.which("shellcheck") is None,
  reason="shellcheck is not installed (apt-get install shellcheck)",
)
@pytest.mark.parametrize("script", [TPU_POD, SBATCH], ids=lambda p: p.name)
def test_shellcheck_finds_nothing(script):
  result = subprocess.run(
    ["shellcheck", "--severity=style", str(script)], capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stdout + result.stderr


# -- launch/tpu_pod.sh --------------------------------------------------------------------------


def tpu_pod(*args, env=None):
  return subprocess.run(
    ["bash", str(TPU_POD), *args], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
  )


POD_ARGS = [
  "--name",
  "n",
  "--zone",
  "z",
  "--accelerator",
  "v3-32",
  "--config",
  "configs/cifar10.py",
  "--workdir",
  "gs://b/w",
]


def ssh_command(argv):
  """The remote command line of a `gcloud compute tpus tpu-vm ssh` argv."""
  [command] = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
  return command


def test_tpu_pod_dry_run_prints_each_command_in_order():
  result = tpu_pod("--dry-run", "all", *POD_ARGS, "--", "--config.training.batch_size=256")
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()]
  tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  tarball = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ddpm_jax-n.tar.gz")
  assert commands[0] == [
    *tpu_vm,
    "create",
    "n",
    "--zone=z",
    "--accelerator-type=v3-32",
    "--version=tpu-ubuntu2204-base",
  ]
  assert commands[1][:4] == ["tar", "-czf", tarball, "--exclude=./.git"]
  assert commands[1][-3:] == ["-C", str(REPO), "."] and "--exclude=./.venv" in commands[1]
  assert commands[2] == [
    *tpu_vm,
    "scp",
    "--zone=z",
    tarball,
    "n:ddpm_jax_code.tar.gz",
    "--worker=all",
  ]
  install, train, tail = commands[3], commands[4], commands[5]
  for argv, worker in ((install, "all"), (train, "all"), (tail, "0")):
    assert argv[:8] == [*tpu_vm, "ssh", "n", "--zone=z", f"--worker={worker}"]
  assert "pip install -q -e '.[tpu]'" in ssh_command(install)
  assert (
    "nohup bash -c 'PYTHONUNBUFFERED=1 python3 -m ddpm_jax.main "
    "--config=configs/cifar10.py --workdir=gs://b/w --mode=train "
    "--config.training.batch_size=256 > train.log 2>&1; echo $? > train.exit'" in ssh_command(train)
  )
  assert "tail -n +1 -F" in ssh_command(tail)
  assert commands[6] == [*tpu_vm, "delete", "n", "--zone=z", "--quiet"]
  assert len(commands) == 7


def test_tpu_pod_dry_run_with_a_git_repo_spot_project_and_keep():
  result = tpu_pod(
    "--dry-run",
    "all",
    *POD_ARGS,
    "--repo",
    "https://example.com/d.git",
    "--branch",
    "dev",
    "--spot",
    "--project",
    "my project",
    "--keep",
  )
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()]
  assert [c[4] for c in commands] == ["create", "ssh", "ssh", "ssh"]  # No delete with --keep.
  assert commands[0][-2:] == ["--version=tpu-ubuntu2204-base", "--spot"]
  assert all(c[7] == "--project=my project" for c in commands)
  setup = ssh_command(commands[1])
  assert (
    "git clone --depth=1 --branch=dev https://example.com/d.git ddpm_jax" in setup
    and "fetch -q --depth=1 https://example.com/d.git dev" in setup
  )


@pytest.mark.parametrize(
  "args, message",
  [
    (["all", "--zone", "z"], "--name is required"),
    (["logs", "--name", "n"], "--zone is required"),
    (["create", "--name", "n", "--zone", "z"], "--accelerator is required"),
    (["train", "--name", "n", "--zone", "z", "--workdir", "gs://b/w"], "--config is required"),
    (
      ["train", "--name", "n", "--zone", "z", "--config", "configs/cifar10.py"],
      "--workdir is required",
    ),
    (
      ["train", "--name", "n", "--zone", "z", "--config", "configs/nope.py", "--workdir", "gs://b"],
      "--config 'configs/nope.py' is not a file",
    ),
    (["--name", "n", "--zone", "z"], "no step given"),
    (["launch", "--name", "n", "--zone", "z"], "unknown step 'launch'"),
    (["logs", "--name", "n", "--zone", "z", "--size", "8"], "unknown option '--size'"),
    (["logs", "--name", "--zone", "z"], "--name needs a value"),
    (["logs", "--name", "My_TPU", "--zone", "z"], "--name 'My_TPU' must be lowercase"),
    (
      ["create", "--name", "n", "--zone", "z", "--accelerator", "v3-8", "--spot", "--preemptible"],
      "--spot and --preemptible exclude each other",
    ),
  ],
)
def test_tpu_pod_rejects_missing_or_bad_arguments(args, message):
  result = tpu_pod("--dry-run", *args)
  assert result.returncode == 2
  assert f"error: {message}" in result.stderr
  assert result.stdout == ""


def test_tpu_pod_help():
  result = tpu_pod("--help")
  assert result.returncode == 0 and result.stdout.startswith("Usage: launch/tpu_pod.sh")


@pytest.fixture
def fake_tpu_vm(tmp_path):
  """A stub gcloud that runs ssh commands in a local 'worker' home, and a stub python3."""
  bin_dir, home = tmp_path / "bin", tmp_path / "worker_home"
  bin_dir.mkdir()
  home.mkdir()
  calls = tmp_path / "gcloud_calls.jsonl"
  write_executable(
    bin_dir / "gcloud",
    f"""
      #!{sys.executable}
      import json, os, subprocess, sys
      args = sys.argv[1:]
      with open({str(calls)!r}, "a") as f:
        f.write(json.dumps(args) + "\\n")
      home = {str(home)!r}
      positional = [a for a in args[4:] if not a.startswith("--")]
      if args[3] == "scp":
        src, dst = positional
        subprocess.run(["cp", src, os.path.join(home, dst.split(":", 1)[1])], check=True)
      elif args[3] == "ssh":
        [command] = [a[len("--command="):] for a in args if a.startswith("--command=")]
        sys.exit(subprocess.run(["bash", "-c", command], cwd=home).returncode)
  """,
  )
  write_executable(
    bin_dir / "python3",
    """
      #!/bin/bash
      if [[ $1 == -m && $2 == pip ]]; then exit 0; fi
      if [[ $1 == -m && $2 == ddpm_jax.main ]]; then
        shift 2
        printf 'ARG<%s>\\n' "$@"
        echo "cwd=$(basename "$PWD") unbuffered=$PYTHONUNBUFFERED"
        exit "${FAKE_MAIN_STATUS:-0}"
      fi
      exit 99
  """,
  )
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
  return env, home, calls


def test_tpu_pod_all_runs_the_job_on_a_stub_worker_and_deletes_it(fake_tpu_vm):
  env, home, calls = fake_tpu_vm
  tricky = ["--config.training.batch_size=256", "--config.x=it's (a) $HOME `test`", ""]
  result = tpu_pod(
    "all",
    *POD_ARGS[:-1],
    "gs://b/my work",
    "--data-dir",
    "gs://b/tf ds",
    "--",
    *tricky,
    env=dict(env, FAKE_MAIN_STATUS="3"),
  )
  # The job's arguments arrive intact through both levels of quoting, and its log streams back.
  args = [line[4:-1] for line in result.stdout.splitlines() if line.startswith("ARG<")]
  assert args == [
    "--config=configs/cifar10.py",
    "--workdir=gs://b/my work",
    "--mode=train",
    "--config.data.data_dir=gs://b/tf ds",
    *tricky,
  ]
  assert "cwd=ddpm_jax unbuffered=1" in result.stdout
  assert "ddpm_jax.main exited with status 3" in result.stdout
  # A failed job still ends with the slice deleted, and the script exits with the job's status.
  assert result.returncode == 3, result.stderr
  verbs = [json.loads(line)[3] for line in calls.read_text().splitlines()]
  assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "delete"]
  # The code reached the worker without the virtualenv or git; the local tarball is gone.
  assert (home / "ddpm_jax" / "ddpm_jax" / "main.py").is_file()
  assert not (home / "ddpm_jax" / ".venv").exists() and not (home / "ddpm_jax" / ".git").exists()
  assert (home / "ddpm_jax" / "train.exit").read_text().strip() == "3"
  assert not list(Path(env["TMPDIR"]).glob("ddpm_jax-*.tar.gz"))


def test_tpu_pod_refuses_to_start_a_second_run_on_a_busy_worker(fake_tpu_vm):
  env, home, _ = fake_tpu_vm
  workdir = home / "ddpm_jax"
  workdir.mkdir()
  sleeper = subprocess.Popen(["sleep", "30"])
  try:
    (workdir / "train.pid").write_text(f"{sleeper.pid}\n")
    result = tpu_pod("train", *POD_ARGS, env=env)
  finally:
    sleeper.kill()
    sleeper.wait()
  assert result.returncode == 1
  assert "ddpm_jax is still running on" in result.stderr
  assert not (workdir / "train.log").exists()


# -- launch/slurm_gpu.sbatch --------------------------------------------------------------------


def sbatch_directives():
  lines = SBATCH.read_text().splitlines()
  first_command = next(
    i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")
  )
  directives = {}
  for i, line in enumerate(lines):
    if line.startswith("#SBATCH"):
      assert i < first_command, f"sbatch ignores #SBATCH after the first command: {line}"
      key, _, value = line.split(maxsplit=1)[1].partition("=")
      directives[key] = value
  return directives


def test_sbatch_directives():
  directives = sbatch_directives()
  assert SBATCH.read_text().startswith("#!/bin/bash\n# shellcheck shell=bash\n")
  assert {k: directives[k] for k in ("--nodes", "--ntasks-per-node", "--gpus-per-node")} == {
    "--nodes": "2",
    "--ntasks-per-node": "1",
    "--gpus-per-node": "8",
  }
  assert directives["--requeue"] == "" and directives["--open-mode"] == "append"
  assert directives["--signal"] == "B:USR1@180"
  srun = [line for line in SBATCH.read_text().splitlines() if line.startswith("srun ")]
  assert len(srun) == 1 and '-m ddpm_jax.main --config="$CONFIG"' in srun[0]


@pytest.fixture
def fake_slurm(tmp_path):
  """Stub srun/scancel/scontrol on PATH that record what the batch script asks of them."""
  bin_dir, log = tmp_path / "bin", tmp_path / "slurm.log"
  bin_dir.mkdir()
  write_executable(
    bin_dir / "srun",
    f"""
      #!/bin/bash
      echo $$ > {tmp_path}/srun.pid
      printf '%s\\n' "$@" > {tmp_path}/srun.args
      echo "JAX_LOCAL_DEVICE_IDS=${{JAX_LOCAL_DEVICE_IDS:-unset}}" > {tmp_path}/srun.env
      if [[ ${{FAKE_TIME_LIMIT:-0}} == 1 ]]; then
        trap 'echo "srun: SIGTERM, saving" >> {log}; exit 0' TERM
        kill -USR1 "$PPID"  # What SLURM does at --signal=B:USR1@180.
        for _ in $(seq 100); do sleep 0.1; done
        echo "srun: no SIGTERM came" >> {log}
        exit 1
      fi
      exit "${{FAKE_SRUN_STATUS:-0}}"
  """,
  )
  write_executable(
    bin_dir / "scancel",
    f"""
      #!/bin/bash
      echo "scancel $*" >> {log}
      kill -TERM "$(cat {tmp_path}/srun.pid)"
  """,
  )
  write_executable(
    bin_dir / "scontrol",
    f"""
      #!/bin/bash
      echo "scontrol $*" >> {log}
  """,
  )
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  write_executable(venv / "bin" / "python", "#!/bin/bash\nexit 99\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_LOCAL"))}
  env.update(
    PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    SLURM_JOB_ID="4242",
    SLURM_SUBMIT_DIR=str(REPO),
    SLURM_NTASKS_PER_NODE="1",
    SLURM_GPUS_ON_NODE="8",
    WORKDIR="/shared/ddpm run",
    VENV=str(venv),
    EXTRA="--config.training.log_every=10",
  )

  def run_batch(*args, **env_updates):
    result = subprocess.run(
      ["bash", str(SBATCH), *args],
      capture_output=True,
      text=True,
      timeout=60,
      cwd=tmp_path,
      env=dict(env, **env_updates),
    )
    srun_args = (
      (tmp_path / "srun.args").read_text().splitlines()
      if (tmp_path / "srun.args").exists()
      else None
    )
    srun_env = (
      (tmp_path / "srun.env").read_text().strip() if (tmp_path / "srun.env").exists() else None
    )
    return result, srun_args, srun_env, log.read_text() if log.exists() else ""

  return run_batch, venv


def test_sbatch_runs_main_with_srun_on_all_gpus_of_each_node(fake_slurm):
  run_batch, venv = fake_slurm
  result, srun_args, srun_env, log = run_batch("--config.training.batch_size=256", "--config.x=a b")
  assert result.returncode == 0, result.stderr
  assert srun_args == [
    "--kill-on-bad-exit=1",
    f"{venv}/bin/python",
    "-m",
    "ddpm_jax.main",
    "--config=configs/cifar10.py",
    "--workdir=/shared/ddpm run",
    "--config.training.log_every=10",
    "--config.training.batch_size=256",
    "--config.x=a b",
  ]
  assert srun_env == "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"
  assert log == ""  # No requeue after a finished run.


def test_sbatch_one_task_per_gpu_leaves_device_choice_to_jax(fake_slurm):
  run_batch, _ = fake_slurm
  result, _, srun_env, _ = run_batch(SLURM_NTASKS_PER_NODE="8")
  assert result.returncode == 0 and srun_env == "JAX_LOCAL_DEVICE_IDS=unset"


def test_sbatch_passes_on_a_failure_without_requeueing(fake_slurm):
  run_batch, _ = fake_slurm
  result, _, _, log = run_batch(FAKE_SRUN_STATUS="3")
  assert result.returncode == 3 and log == ""


def test_sbatch_near_the_time_limit_checkpoints_then_requeues(fake_slurm):
  run_batch, _ = fake_slurm
  result, _, _, log = run_batch(FAKE_TIME_LIMIT="1")
  assert result.returncode == 0, result.stdout + result.stderr
  assert log.splitlines() == [
    "scancel --signal=TERM 4242",
    "srun: SIGTERM, saving",
    "scontrol requeue 4242",
  ]


def test_sbatch_without_workdir_stops_with_a_message(fake_slurm):
  run_batch, _ = fake_slurm
  result, srun_args, _, _ = run_batch(WORKDIR="")
  assert result.returncode != 0 and "set WORKDIR" in result.stderr and srun_args is None


# -- launch/local_multiprocess.py ---------------------------------------------------------------


def load_launcher():
  spec = importlib.util.spec_from_file_location("local_multiprocess", LAUNCHER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# A stand-in for ddpm_jax.main: prints its flags and environment; FAKE_MODE picks what it does.
FAKE_MAIN = textwrap.dedent("""
    import os, signal, sys, time
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    i, mode = flags["process_id"], os.environ.get("FAKE_MODE", "ok")
    print(f"flags={sorted(flags.items())}")
    print(f"XLA_FLAGS={os.environ['XLA_FLAGS']} JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')}")
    if mode == "ok":
      sys.exit(0)
    if mode == "fail" and i == "1":
      time.sleep(0.5)
      sys.exit(3)
    def on_term(signum, frame):
      print(f"{i} saved on SIGTERM", flush=True)
      sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    time.sleep(60)
    sys.exit(4)
""")


def run_fake(tmp_path, mode, **kwargs):
  launcher = load_launcher()
  out = tmp_path / "out.txt"
  env = dict(
    os.environ,
    FAKE_MODE=mode,
    XLA_FLAGS="--xla_cpu_keep=1 --xla_force_host_platform_device_count=4",
  )
  with open(out, "w") as f:
    start = time.monotonic()
    code = launcher.launch(
      ["--workdir=/tmp/w x"],
      2,
      3,
      port=12345,
      env=env,
      command=[sys.executable, "-c", FAKE_MAIN],
      grace_secs=5,
      out=f,
      **kwargs,
    )
  return code, out.read_text().splitlines(), time.monotonic() - start


def test_launcher_gives_each_process_its_flags_devices_and_prefix(tmp_path):
  code, lines, _ = run_fake(tmp_path, "ok")
  assert code == 0
  for i in (0, 1):
    flags = [
      ("coordinator_address", "localhost:12345"),
      ("num_processes", "2"),
      ("process_id", str(i)),
      ("workdir", "/tmp/w x"),
    ]
    assert f"[{i}] flags={flags}" in lines
    assert (
      f"[{i}] XLA_FLAGS=--xla_cpu_keep=1 --xla_force_host_platform_device_count=3 JAX_PLATFORMS=cpu"
    ) in lines


def test_launcher_stops_the_others_when_one_fails(tmp_path):
  code, lines, seconds = run_fake(tmp_path, "fail")
  assert code == 3
  assert "[0] 0 saved on SIGTERM" in lines  # Process 0 would have slept 60 s.
  assert seconds < 20


def test_launcher_passes_sigterm_on_to_every_process(tmp_path):
  script = (
    f"import sys; sys.path.insert(0, {str(LAUNCHER.parent)!r})\n"
    "import local_multiprocess as lm\n"
    f"sys.exit(lm.launch([], 2, 1, command=[sys.executable, '-c', {FAKE_MAIN!r}]))\n"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", script],
    stdout=subprocess.PIPE,
    text=True,
    env=dict(os.environ, FAKE_MODE="wait"),
  )
  ready, lines = 0, []
  try:
    for line in proc.stdout:
      lines.append(line.rstrip("\n"))
      ready += line.endswith("] ready\n")
      if ready == 2:
        proc.send_signal(signal.SIGTERM)
        break
    rest, _ = proc.communicate(timeout=30)
  finally:
    proc.kill()
  lines += rest.splitlines()
  assert proc.returncode == 0, lines
  assert "[0] 0 saved on SIGTERM" in lines and "[1] 1 saved on SIGTERM" in lines


def test_launcher_cli_rejects_bad_usage():
  for argv, message in (
    ([], "give ddpm_jax.main's flags after '--'"),
    (["--num_processes=0", "--", "--config=c"], "--num_processes=0 must be"),
    (["--", "--process_id=1"], "the launcher sets"),
  ):
    result = subprocess.run(
      [sys.executable, str(LAUNCHER), *argv], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr


TINY = [
  f"--config={REPO}/configs/digits.py",
  "--config.model.num_res_blocks=1",
  "--config.model.ch_mult=(1,)",
  "--config.model.attn_resolutions=()",
  "--config.diffusion.num_timesteps=20",
  "--config.training.batch_size=8",
  "--config.training.log_every=1",
  "--config.training.sample_every=0",
  "--config.training.fid_num_samples=0",
  "--config.data.num_shards=2",
]


def test_launcher_trains_two_processes_of_two_devices(tmp_path):
  workdir = tmp_path / "wd"
  result = subprocess.run(
    [
      sys.executable,
      str(LAUNCHER),
      "--num_processes=2",
      "--devices_per_process=2",
      "--",
      *TINY,
      f"--workdir={workdir}",
      f"--config.data.data_dir={tmp_path / 'tfds'}",
      "--config.training.num_train_steps=2",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  lines = result.stdout.splitlines()
  for i in (0, 1):
    assert any(
      line.startswith(f"[{i}] ") and f"Process {i} of 2, 2 local of 4 devices" in line
      for line in lines
    ), result.stdout[-4000:]
    assert any(line.startswith(f"[{i}] ") and "[2] grad_norm=" in line for line in lines)
  # Step 1 too: under checkpoint_every_secs a run without a checkpoint saves at its first log step
  # (Orbax's time policy, process 0 deciding for both).
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]


def test_launcher_returns_the_status_of_a_failed_job(tmp_path, capsys):
  start = time.monotonic()
  code = load_launcher().launch(
    [*TINY, f"--workdir={tmp_path}", "--config.training.batch_size=3"],
    num_processes=2,
    devices_per_process=2,
  )
  out = capsys.readouterr().out
  assert code == 2, out[-4000:]
  for i in (0, 1):
    assert f"[{i}] error: config.training.batch_size=3 is not allowed" in out, out[-4000:]
  assert time.monotonic() - start < 60
  assert not (tmp_path / "checkpoints").exists()
