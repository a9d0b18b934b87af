"""Tests of ddpm_jax.checkpoints (the checkpointer and its readers): roundtrip, rotation, save
schedule, kill -9 mid-save, restore onto another device count, the error for a checkpoint of
another config, saves that fail, and corrupt checkpoints (checksums, the fallback of training,
the errors of readers).

Cases that need a different XLA device count, or a process to kill, run this file as a script in a
subprocess (`python tests/test_checkpointing.py MODE ...`), since the device count is fixed per
process.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import struct
from jax.experimental import multihost_utils

from ddpm_jax import parallel
from ddpm_jax.checkpoints import readers
from ddpm_jax.checkpoints.checkpointer import (
  Checkpointer,
  CheckpointSaveError,
  CorruptCheckpointError,
  IncompatibleCheckpointError,
  NonFiniteStateError,
  abstract_state,
  checksums,
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


def make_state(
  step: int, width: int = 8, other_config: bool = False, sharding=None, noise: bool = False
) -> TrainState:
  """A TrainState whose every value encodes `step` (all exact in float32 for width <= 4e6).

  With `noise`, the conv kernel (and the EMA and Adam moments made from it) holds normal noise
  drawn from `step`, which the file format cannot compress: each stored byte is a byte of a value.
  """
  sharding = sharding or replicated_sharding()
  kernel = jnp.arange(width * 4, dtype=jnp.float32).reshape(width, 4) + step
  if noise:
    kernel = jax.random.normal(jax.random.PRNGKey(step), (width, 4))
  params = {
    "conv": {"kernel": kernel, "bias": jnp.full((4,), -step, jnp.float32)},
    "dense": {"kernel": jnp.full((4, 2), step, jnp.float32)},
  }
  if other_config:  # Another model config: a renamed layer, a new one and other shapes.
    params = {
      "conv": {"kernel": jnp.zeros((width * 2, 4)), "bias": jnp.zeros((4,))},
      "dense_out": {"kernel": jnp.zeros((4, 2))},
      "attn": {"q": jnp.zeros((4, 4))},
    }
  opt_state = jax.tree.map(lambda x: x + 2 * step, optax.adam(1e-3).init(params))
  state = TrainState(
    step=jnp.asarray(step, jnp.int32),
    params=params,
    ema_params=jax.tree.map(lambda x: 0.5 * x, params),
    opt_state=opt_state,
    rng=jax.random.PRNGKey(step),
  )
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
  return {
    str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
    for p in sorted(directory.rglob("*"))
  }


def run_child(mode: str, *args: str, devices: int, **popen_kwargs) -> subprocess.Popen:
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
  )
  return subprocess.Popen(
    [sys.executable, __file__, mode, *args], env=env, text=True, **popen_kwargs
  )


class FakeClock:
  """Orbax's clock (its save-decision policies read `datetime.datetime.now`), moved by hand."""

  def __init__(self):
    self.now = 1000.0
    base, clock = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc), self

    class Datetime(datetime.datetime):
      @classmethod
      def now(cls, tz=None):
        return base + datetime.timedelta(seconds=clock.now)

    self.module = SimpleNamespace(
      datetime=Datetime, timezone=datetime.timezone, timedelta=datetime.timedelta
    )

  def install(self) -> None:
    ocp.checkpoint_manager.datetime = self.module


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
  bad = make_state(1).replace(
    ema_params={
      "conv": {"kernel": jnp.full((8, 4), jnp.nan), "bias": jnp.zeros(4)},
      "dense": {"kernel": jnp.zeros((4, 2))},
    }
  )
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
      abstract_train_state()
    )
  assert not (tmp_path / "none").exists()


def test_should_save_by_steps_and_seconds(tmp_path, monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(ocp.checkpoint_manager, "datetime", clock.module)
  state = make_state(0)
  with Checkpointer(tmp_path, keep=3, every_steps=10, every_secs=60) as ckpt:
    assert ckpt.should_save(3) and ckpt.save(3, state)  # No checkpoint yet: due at once.
    ckpt.wait_until_finished()
    assert [s for s in range(0, 31) if ckpt.should_save(s)] == [10, 20, 30]
    assert not ckpt.save(7, state)  # Not due: nothing written.
    clock.now += 60
    assert ckpt.should_save(7) and ckpt.save(7, state)
    ckpt.wait_until_finished()
    assert not ckpt.should_save(8)  # The timer restarted at the save.
    clock.now += 59
    assert not ckpt.should_save(9)
    clock.now += 1
    assert ckpt.should_save(9)
    assert not ckpt.should_save(7) and not ckpt.should_save(5)  # At or before the latest save.
    assert ckpt.should_save(10)
    assert ckpt.save(12, state, force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 7, 12]
  with Checkpointer(tmp_path, keep=3, every_steps=0, every_secs=0) as ckpt:
    clock.now += 1e6
    assert not any(ckpt.should_save(s) for s in (13, 20, 100))


def kill_during_a_save(
  child: subprocess.Popen, directory: Path, secs: float, rand: random.Random
) -> bool:
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
      child = run_child(
        "save_loop", str(directory), str(KILL_WIDTH), devices=2, stdout=subprocess.PIPE, stderr=log
      )
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
  saver = run_child(
    "save_once", str(tmp_path), devices=4, stdout=subprocess.PIPE, stderr=subprocess.PIPE
  )
  out, err = saver.communicate(timeout=120)
  assert saver.returncode == 0 and "saved on 4 devices" in out, err[-3000:]
  restorer = run_child(
    "restore_check", str(tmp_path), devices=2, stdout=subprocess.PIPE, stderr=subprocess.PIPE
  )
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
      children.append(
        run_child(
          "two_processes",
          str(tmp_path / "ckpt"),
          str(port),
          str(i),
          devices=2,
          stdout=f,
          stderr=subprocess.STDOUT,
        )
      )
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
  assert all(f"process {i} ok" in out for i, out in enumerate(outputs)), "\n".join(
    f"process {i} (rc {c.returncode}): {out[-2000:]}"
    for i, (c, out) in enumerate(zip(children, outputs, strict=True))
  )
  # Written by 2 processes x 2 devices, restored by this single process.
  with Checkpointer(tmp_path / "ckpt", keep=2, every_steps=1) as ckpt:
    assert ckpt.all_steps() == [3, 4]
    assert_state_equal(ckpt.restore(abstract_train_state()), make_state(4))
  with Checkpointer(tmp_path / "ckpt_noisy", keep=2, every_steps=1) as ckpt:
    assert ckpt.all_steps() == [3, 4]
    assert_state_equal(ckpt.restore(abstract_train_state(4096)), make_state(4, 4096, noise=True))
  assert [p.name for p in (tmp_path / "ckpt_noisy_corrupt").iterdir()] == ["4"]


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


# Saves that fail.


def test_a_relative_directory_is_made_absolute(tmp_path, monkeypatch):
  # The first README command passes a relative workdir; Orbax's background write rejects
  # relative paths, so the save used to fail unseen and leave only `500.orbax-checkpoint-tmp`.
  monkeypatch.chdir(tmp_path)
  with Checkpointer(os.path.join("run", "checkpoints"), keep=2, every_steps=1) as ckpt:
    assert ckpt.directory == str(tmp_path / "run" / "checkpoints")
    assert ckpt.save(5, make_state(5))
  assert step_dirs(tmp_path / "run" / "checkpoints") == ["5"]
  monkeypatch.chdir("/")
  with Checkpointer(tmp_path / "run" / "checkpoints", keep=2, every_steps=1) as ckpt:
    assert_state_equal(ckpt.restore(abstract_train_state()), make_state(5))


class FileSizeLimit:
  """While active, writing a file past `max_bytes` fails with EFBIG ("File too large"), as a
  full disk would fail it: a real failure of the write path, in whichever thread writes."""

  def __init__(self, max_bytes: int):
    self.max_bytes = max_bytes

  def __enter__(self):
    resource = pytest.importorskip("resource")
    self.resource = resource
    self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Else the kernel kills us.
    self.limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_bytes, self.limits[1]))

  def __exit__(self, *exc_info):
    self.resource.setrlimit(self.resource.RLIMIT_FSIZE, self.limits)
    signal.signal(signal.SIGXFSZ, self.handler)


WIDE = 32_768  # A [32768, 4] noise kernel: 512 KiB per array, past LIMIT.
LIMIT = 64 * 1024


def raise_at(call: str, ckpt: Checkpointer) -> None:
  """Makes `call` on `ckpt` (should_save is not blocking: retried until the save is over)."""
  if call == "should_save":
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      ckpt.should_save(10)
      time.sleep(0.05)
    pytest.fail("should_save never reported the failed save")
  {
    "save": lambda: ckpt.save(3, make_state(3), force=True),
    "wait_until_finished": ckpt.wait_until_finished,
    "close": ckpt.close,
  }[call]()


@pytest.mark.parametrize("call", ["should_save", "save", "wait_until_finished", "close", "sync"])
def test_a_failed_save_stops_with_one_clear_error(tmp_path, call):
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(directory, keep=3, every_steps=1, async_save=call != "sync")
  assert ckpt.save(1, make_state(1, WIDE, noise=True))
  ckpt.wait_until_finished()
  with FileSizeLimit(LIMIT), pytest.raises(CheckpointSaveError) as info:
    if call == "sync":
      ckpt.save(2, make_state(2, WIDE, noise=True))
    else:  # The write fails in Orbax's background thread, after save() returned.
      assert ckpt.save(2, make_state(2, WIDE, noise=True))
      raise_at(call, ckpt)
  message = str(info.value)
  assert message.startswith(f"Saving step 2 to {directory} failed: "), message
  assert "File too large" in message and "\n" not in message
  assert "the latest complete checkpoint there is step 1" in message
  assert "rerun the same command to resume" in message
  # Every later call says the same, none goes on as if it had been saved.
  for later in (
    lambda: ckpt.should_save(10),
    lambda: ckpt.save(3, make_state(3), force=True),
    ckpt.wait_until_finished,
    lambda: ckpt.restore(abstract_train_state()),
    ckpt.close,
  ):
    with pytest.raises(CheckpointSaveError) as again:
      later()
    assert str(again.value) == message
  assert ckpt.all_steps() == [1]
  # What the failed save left is not a checkpoint: the next run resumes from step 1.
  assert step_dirs(directory) == ["1"] and (directory / f"2{TMP_MARKER}").is_dir()
  with Checkpointer(directory, keep=3, every_steps=1) as ckpt:
    assert ckpt.all_steps() == [1]
    state, restored = ckpt.restore_or_init(lambda: make_state(0, WIDE, noise=True))
    assert restored
    assert_state_equal(state, make_state(1, WIDE, noise=True))


def test_a_failed_save_inside_with_is_raised_once(tmp_path, caplog):
  # The limit is lifted after the Checkpointer's __exit__, which waits for the failing write.
  with (
    pytest.raises(CheckpointSaveError, match="Saving step 2") as info,
    FileSizeLimit(LIMIT),
    Checkpointer(tmp_path, keep=3, every_steps=1) as ckpt,
  ):
    assert ckpt.save(2, make_state(2, WIDE, noise=True))
  assert "File too large" in str(info.value)
  with (
    pytest.raises(KeyError, match="body"),
    FileSizeLimit(LIMIT),  # Not replaced by it...
    Checkpointer(tmp_path, keep=3, every_steps=1) as ckpt,
  ):
    assert ckpt.save(3, make_state(3, WIDE, noise=True))
    raise KeyError("body")
  logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Saving step 3")]
  assert len(logged) == 1 and "File too large" in logged[0]  # ...and the failure is logged.
  assert step_dirs(tmp_path) == []


# Checksums and corrupt checkpoints.


def test_checksums_change_under_any_single_bit_flip():
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 5)))
  reference = checksums({"x": x})["x"]
  for index in range(x.size):
    for bit in range(32):
      words = x.copy().view(np.uint32).reshape(-1)
      words[index] ^= np.uint32(1 << bit)
      assert checksums({"x": words.view(np.float32).reshape(3, 5)})["x"] != reference, (index, bit)
  swapped = x.copy().reshape(-1)
  swapped[[0, 1]] = swapped[[1, 0]]
  assert checksums({"x": swapped.reshape(3, 5)})["x"] != reference
  # Other dtypes; and the value does not depend on the layout over devices.
  for dtype in (jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_):
    y = (jnp.arange(16) % 3).astype(dtype)
    flipped = y.at[7].set(jnp.asarray(3 if dtype != jnp.bool_ else 0, dtype))
    assert checksums([y])["0"] != checksums([flipped])["0"], dtype
  sharded = jax.device_put(
    x.reshape(-1)[:12],
    jax.sharding.NamedSharding(parallel.make_mesh(), jax.sharding.PartitionSpec("data")),
  )
  assert checksums([sharded]) == checksums([jax.device_put(sharded, replicated_sharding())])


def array_files(step_dir: Path) -> list[Path]:
  """The step's large array data files: those of the noise kernels, params and EMA alike.

  Which file holds which leaf varies from save to save (one file may hold both), so every one is
  damaged throughout: a reader of the EMA params alone must meet the damage too.
  """
  files = [p for p in step_dir.glob("default/ocdbt.process_*/d/*") if p.is_file()]
  assert files, list(step_dir.rglob("*"))
  largest = max(p.stat().st_size for p in files)
  return [p for p in files if p.stat().st_size > largest // 2]


def truncate_array_files(step_dir: Path) -> None:
  for path in array_files(step_dir):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 10])


def delete_array_files(step_dir: Path) -> None:
  for path in array_files(step_dir):
    path.unlink()


def flip_bytes(step_dir: Path) -> None:
  for path in array_files(step_dir):
    data = bytearray(path.read_bytes())
    for i in (len(data) // 4, 3 * len(data) // 4):  # Inside each array when a file holds two.
      data[i : i + 3] = bytes(b ^ 0xFF for b in data[i : i + 3])
    path.write_bytes(bytes(data))


# How each is damaged -> the reason the error gives.
CORRUPTIONS = {
  "truncated array files": (truncate_array_files, "an array file is missing or unreadable"),
  "deleted array files": (delete_array_files, "an array file is missing or unreadable"),
  "deleted _METADATA": (
    lambda d: (d / "default" / "_METADATA").unlink(),
    "its tree metadata (default/_METADATA) is missing",
  ),
  "deleted _CHECKPOINT_METADATA": (
    lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
    "its metadata file _CHECKPOINT_METADATA is missing",
  ),
  "deleted manifest.ocdbt": (
    lambda d: (d / "default" / "manifest.ocdbt").unlink(),
    "its tree metadata is unreadable",
  ),
  # TensorStore reads these without complaint: only the checksums see it.
  "flipped bytes": (flip_bytes, "differ from the checksums recorded when it was saved"),
}


def corrupt_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if "Corrupt checkpoint" in r.getMessage()]


def fake_loop(workdir: Path, width: int = 4096) -> SimpleNamespace:
  """A run's workdir, its state's init function and its EMA params' layout."""
  init_fn = lambda: make_state(0, width, noise=True)  # noqa: E731
  replicated = parallel.replicated(parallel.make_mesh())
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    jax.eval_shape(init_fn).ema_params,
  )
  return SimpleNamespace(workdir=str(workdir), init_fn=init_fn, abstract_params=abstract)


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint(tmp_path, caplog, kind):
  damage, reason = CORRUPTIONS[kind]
  directory = tmp_path / "checkpoints"
  with Checkpointer(directory, keep=3, every_steps=1) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, make_state(step, 4096, noise=True))
  damage(directory / "3")
  before = snapshot(directory)

  # Sampling, evaluation and figures: one error naming the step, why, and what to use instead.
  loop = fake_loop(tmp_path)
  with pytest.raises(CorruptCheckpointError) as info:
    readers.load_ema_params(loop.workdir, loop.abstract_params)
  message = str(info.value)
  assert message.startswith(f"The checkpoint of step 3 ({directory}/3) is corrupt: "), message
  assert reason in message
  assert f"Other steps available in {directory}: [1, 2]" in message, message
  assert "--config.sample.checkpoint_step=2 (the newest older one)" in message
  assert "Nothing was changed on disk" in message and "\n" not in message
  assert info.value.step == 3 and reason in info.value.reason
  with (
    Checkpointer(directory, keep=3, every_steps=1, read_only=True) as reader,
    pytest.raises(CorruptCheckpointError, match="step 3"),
  ):
    reader.restore_or_init(loop.init_fn)
  params, step = readers.load_ema_params(loop.workdir, loop.abstract_params, 2)
  assert step == 2
  assert_state_equal(params, make_state(2, 4096, noise=True).ema_params)
  assert snapshot(directory) == before and not (tmp_path / "checkpoints_corrupt").exists()

  # Training: one warning, then the newest intact step; the bad one is moved out of the way.
  with caplog.at_level(logging.WARNING), Checkpointer(directory, keep=3, every_steps=1) as ckpt:
    state, restored = ckpt.restore_or_init(loop.init_fn)
    assert restored
    assert_state_equal(state, make_state(2, 4096, noise=True))
    assert ckpt.all_steps() == [1, 2]
    assert not ckpt.should_save(2) and ckpt.should_save(3)
    assert ckpt.save(3, make_state(3, 4096, noise=True))  # Step 3 again, from step 2.
    assert ckpt.save(4, make_state(4, 4096, noise=True))
  [warning] = corrupt_warnings(caplog)  # One line: the step, why, where it went, what is lost.
  assert warning.startswith(f"Corrupt checkpoint 3 in {directory} (step 3: "), warning
  assert reason in warning
  assert warning.endswith(
    f"); moved to {tmp_path}/checkpoints_corrupt/3 (not deleted). Resuming from step 2, the "
    "newest intact one: step 3 will be trained again."
  ), warning
  assert "\n" not in warning
  assert snapshot(tmp_path / "checkpoints_corrupt" / "3") == {
    k.removeprefix("3/"): v for k, v in before.items() if k.startswith("3/")
  }
  assert step_dirs(directory) == ["2", "3", "4"]  # keep=3 counted only intact steps.
  with Checkpointer(directory, keep=3, every_steps=1) as ckpt:
    assert_state_equal(ckpt.restore(abstract_train_state(4096), 3), make_state(3, 4096, noise=True))


def test_corrupt_checkpoints_down_to_a_fresh_start(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  with Checkpointer(directory, keep=5, every_steps=1) as ckpt:
    for step in (10, 20, 30):
      ckpt.save(step, make_state(step, 4096, noise=True))
  flip_bytes(directory / "30")
  (directory / "20" / "default" / "_METADATA").unlink()
  init_fn = lambda: make_state(0, 4096, noise=True)
  with caplog.at_level(logging.WARNING), Checkpointer(directory, keep=5, every_steps=1) as ckpt:
    state, restored = ckpt.restore_or_init(init_fn)
    assert restored and int(state.step) == 10 and ckpt.all_steps() == [10]
  [warning] = corrupt_warnings(caplog)
  assert warning.startswith(f"Corrupt checkpoints 30, 20 in {directory} (step 30: the values of ")
  assert f"moved to {tmp_path}/checkpoints_corrupt/30, {tmp_path}/checkpoints_corrupt/20" in warning
  assert warning.endswith(
    "Resuming from step 10, the newest intact one: steps 11..30 will be trained again."
  )

  # The same step can go bad twice; then nothing intact is left.
  with Checkpointer(directory, keep=5, every_steps=1) as ckpt:
    ckpt.save(30, make_state(30, 4096, noise=True))
  (directory / "30" / "_CHECKPOINT_METADATA").unlink()
  truncate_array_files(directory / "10")
  caplog.clear()
  with caplog.at_level(logging.WARNING), Checkpointer(directory, keep=5, every_steps=1) as ckpt:
    state, restored = ckpt.restore_or_init(init_fn)
    assert not restored and int(state.step) == 0 and ckpt.all_steps() == []
    assert ckpt.should_save(10)
  [warning] = corrupt_warnings(caplog)
  assert f"moved to {tmp_path}/checkpoints_corrupt/30_2, {tmp_path}/checkpoints_corrupt/10" in (
    warning
  )
  assert warning.endswith(
    "No intact checkpoint is left, so this run starts from scratch: "
    "steps 1..30 will be trained again."
  ), warning
  assert sorted(p.name for p in (tmp_path / "checkpoints_corrupt").iterdir()) == [
    "10",
    "20",
    "30",
    "30_2",
  ]


def test_errors_that_are_not_corruption_move_nothing(tmp_path, monkeypatch):
  with Checkpointer(tmp_path / "checkpoints", keep=2, every_steps=1) as ckpt:
    ckpt.save(1, make_state(1))
  before = snapshot(tmp_path)

  def unavailable(*args, **kwargs):
    raise ValueError("UNAVAILABLE: the storage service did not answer")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", unavailable)
  with Checkpointer(tmp_path / "checkpoints", keep=2, every_steps=1) as ckpt:
    with pytest.raises(ValueError, match="UNAVAILABLE"):
      ckpt.restore_or_init(lambda: make_state(0))
    with pytest.raises(IncompatibleCheckpointError):
      ckpt.restore_or_init(lambda: make_state(0, other_config=True))
  assert snapshot(tmp_path) == before


def test_checkpoints_without_checksums_restore_unverified(tmp_path, caplog):
  # As written before checksums were recorded: the same files, no custom metadata.
  with Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    ckpt.save(1, make_state(1))
  path = tmp_path / "1" / "_CHECKPOINT_METADATA"
  metadata = json.loads(path.read_text())
  assert set(metadata["custom_metadata"]) == {"ddpm_jax_checksums"}
  path.write_text(json.dumps({**metadata, "custom_metadata": {}}))
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    assert_state_equal(ckpt.restore(abstract_train_state()), make_state(1))
    assert_state_equal(ckpt.restore(abstract_train_state(), 1), make_state(1))
  told = [r.getMessage() for r in caplog.records if "has no checksums" in r.getMessage()]
  assert len(told) == 1, told


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
  clock.install()
  with Checkpointer(directory, keep=2, every_steps=100, every_secs=60) as ckpt:
    assert ckpt.should_save(2) and ckpt.save(2, make_state(2))  # No checkpoint yet: due.
    ckpt.wait_until_finished()
    clock.now += 30 + 100 * int(process_id)  # Process 1 alone would think a save is due.
    assert not ckpt.should_save(7)  # Process 0's clock decides for both.
    clock.now += 30
    assert ckpt.should_save(7)
    assert ckpt.save(3, make_state(3)) and ckpt.save(4, make_state(4), force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 4]
    assert_state_equal(ckpt.restore(abstract_train_state()), make_state(4))
  # A corrupt latest step: both processes take step 3; process 0 alone moves step 4 aside.
  noisy = directory + "_noisy"
  with Checkpointer(noisy, keep=3, every_steps=1) as ckpt:
    for step in (3, 4):
      assert ckpt.save(step, make_state(step, 4096, noise=True))
  if process_id == "0":
    flip_bytes(Path(noisy) / "4")
  multihost_utils.sync_global_devices("corrupted")
  with Checkpointer(noisy, keep=3, every_steps=1) as ckpt:
    state, restored = ckpt.restore_or_init(lambda: make_state(0, 4096, noise=True))
    assert restored and ckpt.all_steps() == [3]
    assert_state_equal(state, make_state(3, 4096, noise=True))
    assert ckpt.save(4, make_state(4, 4096, noise=True))
  print(f"process {process_id} ok", flush=True)


if __name__ == "__main__":
  try:
    {
      "save_loop": _child_save_loop,
      "save_once": _child_save_once,
      "restore_check": _child_restore_check,
      "two_processes": _child_two_processes,
    }[sys.argv[1]](*sys.argv[2:])
  except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)  # Exit now: a normal exit would wait for the other processes at shutdown.
