"""Stopping cleanly on SIGTERM (preemption): every process stops at the same step.

While training, a SIGTERM makes the loop save a checkpoint and stop at the next step. Once the
last checkpoint is on disk (the final samples and FID are being computed), nothing is left to
save: `exit_on_sigterm` then makes a SIGTERM end the process at once, with exit status 0, even
while the main thread waits on a long compiled computation.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

import jax


class PreemptionWatcher:
  """Tells the train loop when to save and stop after a SIGTERM.

  With one process a SIGTERM handler sets a flag. With several (after `jax.distributed
  .initialize`), JAX's coordination service receives the signal and `reached_preemption(step)`
  (Orbax's `CheckpointManager.reached_preemption`, through `Checkpointer`) makes all processes
  agree on the step at which to stop.
  """

  def __init__(self, reached_preemption: Callable[[int], bool]):
    self._event = threading.Event()
    self._reached_preemption = reached_preemption
    self._multi_process = jax.process_count() > 1
    self._main_thread = threading.current_thread() is threading.main_thread()
    self._previous = None
    self._wakeup: tuple[int, int, int] | None = None  # (read fd, write fd, previous wakeup fd)
    if not self._multi_process and self._main_thread:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self._event.set()

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (call on every process at every step)."""
    if self._multi_process:
      return self._reached_preemption(step)
    return self._event.is_set()

  def exit_on_sigterm(self, skipped: str, before_exit: Callable[[], None] | None = None) -> None:
    """From now on (until `resume_saving`) a SIGTERM ends the process at once with status 0.

    Call it only when everything worth keeping is on disk. `skipped` says what the exit skips
    (it is logged); `before_exit` runs first (e.g. flushing the metric writer). A SIGTERM
    already received makes the process exit right here.
    """
    if not self._main_thread:
      return
    if self._event.is_set():
      _exit_now(skipped, before_exit)
    if self._previous is None:  # Several processes: JAX's handler was in charge until now.
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    # The interpreter's C-level handler writes each signal's number to this pipe as it arrives,
    # in whatever thread; the watcher thread wakes at once, while the main thread still waits.
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    self._wakeup = (read_fd, write_fd, previous)
    threading.Thread(
      target=_exit_on_signal, args=(read_fd, skipped, before_exit), name="sigterm-exit", daemon=True
    ).start()

  def resume_saving(self) -> None:
    """Ends `exit_on_sigterm`: a SIGTERM again means save and stop at the next step."""
    if self._wakeup is None:
      return
    read_fd, write_fd, previous = self._wakeup
    self._wakeup = None
    signal.set_wakeup_fd(previous)
    os.close(write_fd)  # The watcher thread reads end-of-file and returns.
    del read_fd  # Closed by the watcher thread.

  def close(self) -> None:
    self.resume_saving()
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _exit_on_signal(read_fd: int, skipped: str, before_exit: Callable[[], None] | None) -> None:
  try:
    while data := os.read(read_fd, 64):
      if signal.SIGTERM in data:
        _exit_now(skipped, before_exit)
  finally:
    os.close(read_fd)


def _exit_now(skipped: str, before_exit: Callable[[], None] | None) -> None:
  message = f"SIGTERM received after the last checkpoint was saved: skipping {skipped}; exiting."
  logging.warning("%s", message)
  print(message, file=sys.stderr, flush=True)
  try:
    if before_exit is not None:
      before_exit()
  finally:
    sys.stdout.flush()
    os._exit(0)  # The checkpoint is complete on disk; the computation in flight is abandoned.
