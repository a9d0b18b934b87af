"""Runs N processes of `python -m ddpm_jax.main` on this machine, as a multi-host job would.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \\
      --config=configs/digits.py --workdir=/tmp/ddpm_digits_2proc

Each process gets `--coordinator_address=localhost:PORT --num_processes=N --process_id=i` and
XLA_FLAGS=--xla_force_host_platform_device_count=K (K simulated CPU devices; JAX_PLATFORMS=cpu
unless --jax_platforms says otherwise). Output lines are prefixed with `[i] `. When a process
fails the others are stopped and the launcher exits with the failed one's status; SIGTERM and
SIGINT are passed on to every process (a second one kills them), so a local run can rehearse
preemption. Standard library only; `launch()` is the same thing as a function.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

MAIN = (sys.executable, "-m", "ddpm_jax.main")
_LAUNCHER_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")


def free_port() -> int:
  """A TCP port on localhost that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(
  base: Mapping[str, str], devices_per_process: int, jax_platforms: str | None
) -> dict[str, str]:
  """`base` with K simulated host devices (other XLA flags kept) and, if given, JAX_PLATFORMS."""
  env = dict(base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = " ".join(
    [*flags.split(), f"--xla_force_host_platform_device_count={devices_per_process}"]
  )
  if jax_platforms:
    env["JAX_PLATFORMS"] = jax_platforms
  env["PYTHONUNBUFFERED"] = "1"  # Lines appear as they are printed, not at exit.
  return env


def _exit_code(returncode: int) -> int:
  """A shell-style status: 128 + N for a process killed by signal N."""
  return 128 - returncode if returncode < 0 else returncode


def _copy_lines(stream, prefix: str, out: TextIO, lock: threading.Lock) -> None:
  for raw in iter(stream.readline, b""):
    line = raw.decode("utf-8", errors="replace").rstrip("\n")
    with lock:
      out.write(f"{prefix}{line}\n")
      out.flush()
  stream.close()


class _Children:
  """The started processes, their output threads and the signals passed on to them."""

  def __init__(self, procs: list[subprocess.Popen], threads: list[threading.Thread]):
    self.procs, self.threads = procs, threads
    self.signals_received = 0

  def send(self, sig: int) -> None:
    for p in self.procs:
      if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # It ended since poll().
          p.send_signal(sig)

  def forward(self, signum, frame) -> None:
    """Passes the first SIGTERM/SIGINT on (the job saves and stops); a second one kills."""
    self.signals_received += 1
    self.send(signum if self.signals_received == 1 else signal.SIGKILL)

  def stop(self, grace_secs: float) -> None:
    """SIGTERM to those still running, SIGKILL to those still running `grace_secs` later."""
    self.send(signal.SIGTERM)
    deadline = time.monotonic() + grace_secs
    while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
      time.sleep(0.05)
    self.send(signal.SIGKILL)
    for p in self.procs:
      p.wait()

  def wait(self, grace_secs: float) -> int:
    """0 when all succeed; else the first failure's status, after stopping the others."""
    while True:
      codes = [p.poll() for p in self.procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        self.stop(grace_secs)
        return _exit_code(failed[0])
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.05)


def launch(
  argv_for_main: Sequence[str],
  num_processes: int,
  devices_per_process: int,
  port: int | None = None,
  env: Mapping[str, str] | None = None,
  *,
  jax_platforms: str | None = "cpu",
  command: Sequence[str] = MAIN,
  grace_secs: float = 10.0,
  out: TextIO | None = None,
) -> int:
  """Runs `command + argv_for_main` as processes 0..N-1 of one job; returns the job's status.

  Args:
    argv_for_main: flags for ddpm_jax.main, e.g. ["--config=configs/digits.py", "--workdir=D"].
    num_processes: N.
    devices_per_process: K simulated CPU devices per process (XLA_FLAGS).
    port: the coordinator's port on localhost; a free one when None.
    env: the processes' environment before the settings above (default: os.environ).
    jax_platforms: JAX_PLATFORMS for the processes; None or "" leaves it as `env` has it.
    command: what to run (a test can run a stand-in for ddpm_jax.main).
    grace_secs: how long stopped processes get to exit before SIGKILL.
    out: where the prefixed output lines go (default: sys.stdout).
  Returns:
    0 if every process exits 0, else the first failure's status (128 + N for signal N).
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(
      f"num_processes={num_processes} and devices_per_process="
      f"{devices_per_process} must be at least 1."
    )
  clashing = [a for a in argv_for_main if a.split("=")[0] in _LAUNCHER_FLAGS]
  if clashing:
    raise ValueError(f"The launcher sets {', '.join(_LAUNCHER_FLAGS)} itself; remove {clashing}.")
  port = port or free_port()
  out = out or sys.stdout
  environment = child_env(os.environ if env is None else env, devices_per_process, jax_platforms)
  lock = threading.Lock()
  children = _Children([], [])
  handlers = _forward_signals(children)
  try:
    for i in range(num_processes):
      proc = subprocess.Popen(
        [
          *command,
          *argv_for_main,
          f"--coordinator_address=localhost:{port}",
          f"--num_processes={num_processes}",
          f"--process_id={i}",
        ],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )  # Signals reach them only via us.
      thread = threading.Thread(
        target=_copy_lines, args=(proc.stdout, f"[{i}] ", out, lock), daemon=True
      )
      thread.start()
      children.procs.append(proc)
      children.threads.append(thread)
    status = children.wait(grace_secs)
  except BaseException:
    children.stop(grace_secs)
    raise
  finally:
    for sig, previous in handlers.items():
      signal.signal(sig, previous)
    for thread in children.threads:
      thread.join(timeout=5)
  return status


def _forward_signals(children: _Children) -> dict[int, object]:
  """Installs SIGTERM/SIGINT handlers that pass the signal on; returns the previous handlers."""
  if threading.current_thread() is not threading.main_thread():
    return {}
  return {sig: signal.signal(sig, children.forward) for sig in (signal.SIGTERM, signal.SIGINT)}


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits `LAUNCHER_FLAGS -- MAIN_FLAGS`."""
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(
    prog="launch/local_multiprocess.py",
    usage="%(prog)s [--num_processes=N] [--devices_per_process=K] [--port=P] -- MAIN_FLAGS",
    description="Runs N processes of ddpm_jax.main on this machine, as one multi-host job.",
  )
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument(
    "--devices_per_process",
    type=int,
    default=1,
    help="Simulated CPU devices per process (XLA_FLAGS).",
  )
  parser.add_argument(
    "--port", type=int, default=None, help="Coordinator port on localhost (default: a free one)."
  )
  parser.add_argument(
    "--jax_platforms",
    default="cpu",
    help="JAX_PLATFORMS for the processes; '' keeps the environment's.",
  )
  parser.add_argument(
    "--grace_secs", type=float, default=10.0, help="Time stopped processes get before SIGKILL."
  )
  args = parser.parse_args(argv[:split])
  main_argv = argv[split + 1 :]
  if not main_argv:
    parser.error(
      "give ddpm_jax.main's flags after '--', e.g. -- --config=configs/digits.py "
      "--workdir=/tmp/ddpm"
    )
  for name in ("num_processes", "devices_per_process"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be at least 1")
  clashing = [a for a in main_argv if a.split("=")[0] in _LAUNCHER_FLAGS]
  if clashing:
    parser.error(f"the launcher sets {', '.join(_LAUNCHER_FLAGS)} itself; remove {clashing}")
  return args, main_argv


def main(argv: Sequence[str]) -> int:
  args, main_argv = parse_args(argv)
  return launch(
    main_argv,
    args.num_processes,
    args.devices_per_process,
    args.port,
    jax_platforms=args.jax_platforms,
    grace_secs=args.grace_secs,
  )


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
