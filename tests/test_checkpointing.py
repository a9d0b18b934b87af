"""Tests of ddpm_jax.checkpointing: roundtrip, rotation, save schedule, kill -9 mid-save,
restore onto another device count, and the error for a checkpoint of another config.

Cases that need a different XLA device count, or a process to kill, run this file as a script in a
subprocess (`python tests/test_checkpointing.py MODE ...`), since the device count is fixed per
process.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from ddpm_jax.checkpointing import (
  Checkpointer,
  IncompatibleCheckpointError,
  NonFiniteStateError,
  abstract_state,
  is_finite,
  replicated_sharding,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TMP_MARKER = ".orbax-checkpoint-tmp"
KILL_WIDTH = 1_000_000  # 4 leaves of [1e6, 4] float32: a 64 MB state, slow enough to kill mid-save.


class TrainState(struct.PyTreeNode):
  """The train loop's state layout."""
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  rng: jax.Array


def make_state(step: int, width: int = 8, other_config: bool = False, sharding=None) -> TrainState:
  """A TrainState whose every value encodes `step` (all exact in float32 for width <= 4e6)."""
  sharding = sharding or replicated_sharding()
  params = {
    "conv": {"kernel": jnp.arange(width * 4, dtype=jnp.float32).reshape(width, 4) + step,
             "bias": jnp.full((4,), -step, jnp.float32)},
    "dense": {"kernel": jnp.full((4, 2), step, jnp.float32)},
  }
  if other_config:  # Another model config: a renamed layer, a new one and other shapes.
    params = {"conv": {"kernel": jnp.zeros((width * 2, 4)), "bias": jnp.zeros((4,))},
              "dense_out": {"kernel": jnp.zeros((4, 2))},
              "attn": {"q": jnp.zeros((4, 4))}}
  opt_state = jax.tree.map(lambda x: x + 2 * step, optax.adam(1e-3).init(params))
  state = TrainState(
    step=jnp.asarray(step, jnp.int32), params=params,
    ema_params=jax.tree.map(lambda x: 0.5 * x, params), opt_state=opt_state,
    rng=jax.random.PRNGKey(step))
  return jax.device_put(state, sharding)


def abstract_train_state(width: int = 8, other_config: bool = False, sharding=None):
  sharding = sharding or replicated_sharding()
  return abstract_state(lambda: make_state(0, width, other_config, sharding), sharding)


def assert_state_equal(actual: TrainState, expected: TrainState) -> None:
  assert type(actual) is type(expected)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.dtype == e.dtype and a.shape == e.shape
    assert a.sharding.is_equivalent_to(e.sharding, a.ndim), (a.sharding, e.sharding)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def step_dirs(directory: Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if p.name.isdigit())


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
  """Every file under `directory` -> (size, mtime_ns)."""
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(directory.rglob("*"))}


def run_child(mode: str, *args: str, devices: int, **popen_kwargs) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  return subprocess.Popen([sys.executable, __file__, mode, *args], env=env, text=True,
                          **popen_kwargs)


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self) -> float:
    return self.now


def test_roundtrip_values_and_shardings(tmp_path):
  state = make_state(3)
  with Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    assert ckpt.latest_step() is None
    fresh, restored = ckpt.restore_or_init(lambda: make_state(0))
    assert not restored and int(fresh.step) == 0
    assert ckpt.save(3, state)
    assert not ckpt.save(3, make_state(4), force=True)  # An existing step is never overwritten.
  with Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    assert ckpt.latest_step() == 3
    assert_state_equal(ckpt.restore(abstract_train_state()), state)
    assert_state_equal(ckpt.restore(abstract_train_state(), step=3), state)
    resumed, restored = ckpt.restore_or_init(lambda: make_state(0))
    assert restored
    assert_state_equal(resumed, state)
    with pytest.raises(FileNotFoundError, match="step 2"):
      ckpt.restore(abstract_train_state(), step=2)


def test_non_finite_state_is_not_saved(tmp_path):
  bad = make_state(1).replace(ema_params={"conv": {"kernel": jnp.full((8, 4), jnp.nan),
                                                   "bias": jnp.zeros(4)},
                                          "dense": {"kernel": jnp.zeros((4, 2))}})
  assert is_finite(make_state(1)) and not is_finite(bad)
  with Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    with pytest.raises(NonFiniteStateError, match="NaN"):
      ckpt.save(1, bad, force=True)
    assert ckpt.latest_step() is None
  assert step_dirs(tmp_path) == []


def test_keeps_only_the_latest_k(tmp_path):
  with Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, make_state(step))
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 5
  assert step_dirs(tmp_path) == ["4", "5"]
  with Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    assert ckpt.all_steps() == [4, 5]
    assert_state_equal(ckpt.restore(abstract_train_state(), step=4), make_state(4))


def test_a_read_only_reader_leaves_a_save_in_flight_alone(tmp_path):
  with Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    ckpt.save(5, make_state(5))
  in_flight = tmp_path / "6.orbax-checkpoint-tmp"
  in_flight.mkdir()
  with Checkpointer(tmp_path, keep=2, every_steps=1, read_only=True) as reader:
    assert reader.latest_step() == 5
    assert_state_equal(reader.restore(abstract_train_state()), make_state(5))
  assert in_flight.exists()
  with Checkpointer(tmp_path, keep=2, every_steps=1):
    pass
  # A writer cleans up what a killed save left (Orbax does it in a background thread).
  deadline = time.monotonic() + 30
  while in_flight.exists() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not in_flight.exists()
  with pytest.raises(FileNotFoundError, match="No checkpoint found"):
    Checkpointer(tmp_path / "none", keep=1, every_steps=1, read_only=True).restore(
        abstract_train_state())
  assert not (tmp_path / "none").exists()


def test_should_save_by_steps_and_seconds(tmp_path):
  clock = FakeClock()
  state = make_state(0)
  with Checkpointer(tmp_path, keep=3, every_steps=10, every_secs=60, clock=clock) as ckpt:
    assert [s for s in range(0, 31) if ckpt.should_save(s)] == [10, 20, 30]
    assert not ckpt.save(7, state)  # Not due: nothing written.
    clock.now += 60
    assert ckpt.should_save(7) and ckpt.save(7, state)
    assert not ckpt.should_save(8)  # The timer restarted at the save.
    clock.now += 59
    assert not ckpt.should_save(9)
    clock.now += 1
    assert ckpt.should_save(9)
    assert not ckpt.should_save(7) and not ckpt.should_save(5)  # At or before the latest save.
    assert ckpt.should_save(10)
    assert ckpt.save(12, state, force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [7, 12]
  with Checkpointer(tmp_path, keep=3, every_steps=0, every_secs=0, clock=clock) as ckpt:
    clock.now += 1e6
    assert not any(ckpt.should_save(s) for s in (13, 20, 100))


def kill_during_a_save(child: subprocess.Popen, directory: Path, secs: float,
                       rand: random.Random) -> bool:
  """SIGKILLs `child` at a random instant of one of its next saves (each about `secs` long)."""
  for _ in range(10):
    deadline = time.monotonic() + 60
    while not any(TMP_MARKER in p.name for p in directory.iterdir()):
      assert time.monotonic() < deadline and child.poll() is None, "no save started"
      time.sleep(0.001)
    time.sleep(rand.uniform(0.0, secs))
    if any(TMP_MARKER in p.name for p in directory.iterdir()):  # Still writing: kill now.
      child.send_signal(signal.SIGKILL)
      return True
    secs /= 2  # That save was shorter than the estimate.
  child.send_signal(signal.SIGKILL)
  return False


def test_kill_9_mid_save_keeps_last_completed_step(tmp_path):
  directory = tmp_path / "checkpoints"
  rand = random.Random(0)
  incomplete_left = 0
  for trial in range(3):
    log_path = tmp_path / f"child{trial}.log"
    with open(log_path, "w") as log:
      child = run_child("save_loop", str(directory), str(KILL_WIDTH), devices=2,
                        stdout=subprocess.PIPE, stderr=log)
      try:
        line = child.stdout.readline()  # A first completed save, which also times one.
        assert line.startswith("saved"), (line, log_path.read_text())
        assert kill_during_a_save(child, directory, float(line.split()[2]), rand)
        child.wait(timeout=30)
      finally:
        child.kill()
    # Lines printed before the kill may still be in the pipe.
    last_saved = int((line + child.stdout.read()).splitlines()[-1].split()[1])
    child.stdout.close()
    incomplete_left += any(TMP_MARKER in p.name for p in directory.iterdir())

    with Checkpointer(directory, keep=2, every_steps=1) as ckpt:
      # The save being killed may have completed between its check and the kill.
      latest = ckpt.latest_step()
      assert latest in (last_saved, last_saved + 1), (latest, last_saved)
      restored = ckpt.restore(abstract_train_state(KILL_WIDTH))
      assert_state_equal(restored, make_state(latest, KILL_WIDTH))
      del restored
  assert incomplete_left >= 1  # The kills landed mid-save (it is checked right before each).

  with Checkpointer(directory, keep=2, every_steps=1) as ckpt:
    latest = ckpt.latest_step()
    assert ckpt.save(latest + 10, make_state(latest + 10, width=KILL_WIDTH))
  assert not any(TMP_MARKER in p.name for p in directory.iterdir())  # Leftovers cleaned up.
  assert step_dirs(directory) == sorted([str(latest), str(latest + 10)])


def test_restore_onto_a_different_device_count(tmp_path):
  saver = run_child("save_once", str(tmp_path), devices=4, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
  out, err = saver.communicate(timeout=120)
  assert saver.returncode == 0 and "saved on 4 devices" in out, err[-3000:]
  restorer = run_child("restore_check", str(tmp_path), devices=2, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
  out, err = restorer.communicate(timeout=120)
  assert restorer.returncode == 0 and "restored on 2 devices" in out, err[-3000:]
  # And onto this process's devices, whatever their count.
  with Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    assert_state_equal(ckpt.restore(abstract_train_state()), make_state(7))


def test_two_processes_save_and_agree_on_the_schedule(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  children = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:  # Files, not pipes: a full pipe would stall the other process.
      children.append(run_child("two_processes", str(tmp_path / "ckpt"), str(port), str(i),
                                devices=2, stdout=f, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + 90
  try:  # Until both are done or one failed (the other would then wait for it at a barrier).
    while time.monotonic() < deadline and any(c.poll() is None for c in children):
      if any(c.poll() not in (None, 0) for c in children):
        break
      time.sleep(0.1)
  finally:
    for child in children:
      child.kill()
      child.wait()
  outputs = [log.read_text() for log in logs]
  assert all(f"process {i} ok" in out for i, out in enumerate(outputs)), (
    "\n".join(f"process {i} (rc {c.returncode}): {out[-2000:]}"
              for i, (c, out) in enumerate(zip(children, outputs, strict=True))))
  # Written by 2 processes x 2 devices, restored by this single process.
  with Checkpointer(tmp_path / "ckpt", keep=2, every_steps=1) as ckpt:
    assert ckpt.all_steps() == [3, 4]
    assert_state_equal(ckpt.restore(abstract_train_state()), make_state(4))


def test_incompatible_checkpoint_is_one_clear_error(tmp_path):
  with Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    ckpt.save(5, make_state(5))
  before = snapshot(tmp_path)
  with Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    with pytest.raises(IncompatibleCheckpointError) as info:
      ckpt.restore(abstract_train_state(other_config=True))
    with pytest.raises(IncompatibleCheckpointError):
      ckpt.restore_or_init(lambda: make_state(0, other_config=True))
    # A matching state still restores.
    assert_state_equal(ckpt.restore(abstract_train_state()), make_state(5))
  assert snapshot(tmp_path) == before  # Nothing deleted or rewritten.

  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert "params/dense_out/kernel" in message and "params/attn/q" in message  # Missing.
  assert "params/dense/kernel" in message and "opt_state/0/mu/dense/kernel" in message  # Extra.
  assert "params/conv/kernel: checkpoint (8, 4), expected (16, 4)" in message
  assert "fresh --workdir" in message and "Nothing was changed on disk" in message


# Subprocess entry points (run with XLA_FLAGS setting the device count).


def _child_save_loop(directory: str, width: str) -> None:
  """Saves steps latest+1, latest+2, ... printing 'saved STEP SECONDS' after each completes."""
  width = int(width)
  with Checkpointer(directory, keep=2, every_steps=1) as ckpt:
    first = (ckpt.latest_step() or 0) + 1
    for step in range(first, first + 100):
      state = make_state(step, width)
      start = time.monotonic()
      ckpt.save(step, state)
      ckpt.wait_until_finished()
      print(f"saved {step} {time.monotonic() - start:.3f}", flush=True)


def _child_save_once(directory: str) -> None:
  with Checkpointer(directory, keep=2, every_steps=1) as ckpt:
    assert ckpt.save(7, make_state(7))
  print(f"saved on {jax.device_count()} devices")


def _child_restore_check(directory: str) -> None:
  with Checkpointer(directory, keep=2, every_steps=1) as ckpt:
    restored = ckpt.restore(abstract_train_state())
  assert_state_equal(restored, make_state(7))
  assert all(len(x.sharding.device_set) == jax.device_count() for x in jax.tree.leaves(restored))
  print(f"restored on {jax.device_count()} devices")


def _child_two_processes(directory: str, port: str, process_id: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
  clock = FakeClock()
  with Checkpointer(directory, keep=2, every_steps=100, every_secs=60, clock=clock) as ckpt:
    clock.now += 30 + 100 * int(process_id)  # Process 1 alone would think a save is due.
    assert not ckpt.should_save(7)  # Process 0's clock decides for both.
    clock.now += 30
    assert ckpt.should_save(7)
    assert ckpt.save(3, make_state(3)) and ckpt.save(4, make_state(4), force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 4]
    assert_state_equal(ckpt.restore(abstract_train_state()), make_state(4))
  print(f"process {process_id} ok", flush=True)


if __name__ == "__main__":
  try:
    {"save_loop": _child_save_loop, "save_once": _child_save_once,
     "restore_check": _child_restore_check, "two_processes": _child_two_processes,
     }[sys.argv[1]](*sys.argv[2:])
  except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)  # Exit now: a normal exit would wait for the other processes at shutdown.
