"""Stopping cleanly on SIGTERM (preemption): every process stops at the same step."""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Tells the train loop when to save and stop after a SIGTERM.

  With one process a SIGTERM handler sets a flag. With several (after `jax.distributed
  .initialize`), JAX's coordination service receives the signal and
  `reached_preemption_sync_point` makes all processes agree on the step at which to stop.
  """

  def __init__(self):
    self._event = threading.Event()
    self._multi_process = jax.process_count() > 1
    self._previous = None
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self._event.set()

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (call on every process at every step)."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
