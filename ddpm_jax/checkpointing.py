"""Saving and restoring the train state with Orbax: atomic, asynchronous, layout-independent.

One `Checkpointer` owns `<workdir>/checkpoints`. Each save is a step directory that Orbax writes
under a temporary name and renames when complete, so a run killed at any instant (kill -9
included) leaves the last completed save readable; leftover temporary directories are ignored and
deleted by the next `Checkpointer` on that directory. Old steps are deleted only after a newer one
is complete.

Arrays are stored as global arrays, so a checkpoint restores onto any device or process count: the
caller's abstract state (shapes, dtypes and the *current* shardings) decides the layout. Every
method must be called on all processes of a multi-host job, in the same order; Orbax coordinates
the writes and process 0 alone writes the shared metadata.

Typical use in a train loop::

  with Checkpointer(workdir / "checkpoints", keep=3, every_steps=5000, every_secs=3600) as ckpt:
    state, resumed = ckpt.restore_or_init(init_fn)
    for step in range(int(state.step), num_steps):
      state = train_step(state, batch)
      ckpt.save(step + 1, state)  # saves only when should_save(step + 1); call on all processes
    ckpt.save(num_steps, state, force=True)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from ddpm_jax import train_step

State = TypeVar("State")
PyTree = Any

_MAX_LISTED_KEYS = 10


class IncompatibleCheckpointError(ValueError):
  """A checkpoint's tree (names or shapes) does not match the state being restored."""


class NonFiniteStateError(ValueError):
  """`Checkpointer.save` was given a state with NaN or Inf values; nothing was written."""


def replicated_sharding(devices: list[jax.Device] | None = None) -> NamedSharding:
  """Replicated sharding over a 1-D mesh (axis 'data') of `devices` (default: all devices)."""
  return train_step.replicated(train_step.make_mesh(devices))


def abstract_state(init_fn: Callable[[], State], sharding: jax.sharding.Sharding) -> State:
  """Shapes and dtypes of `init_fn()` without computing it, as `jax.ShapeDtypeStruct`s.

  Leaves that `jax.eval_shape` gives a sharding (e.g. `init_fn` is jitted with `out_shardings`)
  keep it; the others get `sharding`.
  """
  return _with_sharding(jax.eval_shape(init_fn), sharding)


def is_finite(tree: PyTree) -> bool:
  """True when no floating-point leaf of `tree` holds a NaN or an Inf (call on all processes)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return True
  finite = _all_finite(leaves)
  # A scalar is replicated on every device, so the local copy is the global answer.
  return bool(np.asarray(finite.addressable_data(0)))


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _with_sharding(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
  """Each leaf as a ShapeDtypeStruct; its own sharding if it has one, else `sharding`."""

  def to_abstract(x: Any) -> jax.ShapeDtypeStruct:
    leaf_sharding = getattr(x, "sharding", None) or sharding
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=leaf_sharding)

  return jax.tree.map(to_abstract, tree)


def _key_name(key: Any) -> str:
  for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey/FlattenedIndexKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...] | None]:
  """Leaf path ('params/conv/kernel') -> shape. Dataclass fields, dict keys and NamedTuple fields
  all map to the same name, as Orbax stores them all as dicts."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    "/".join(_key_name(k) for k in path): (
      tuple(leaf.shape) if getattr(leaf, "shape", None) is not None else None)
    for path, leaf in flat
  }


def _listing(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED_KEYS]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def _compatibility_problems(saved: PyTree, expected: PyTree) -> list[str]:
  """Human-readable differences between the saved metadata tree and the expected state."""
  saved_shapes, expected_shapes = _flat_shapes(saved), _flat_shapes(expected)
  missing = sorted(expected_shapes.keys() - saved_shapes.keys())
  unexpected = sorted(saved_shapes.keys() - expected_shapes.keys())
  mis_shaped = sorted(
    f"{k}: checkpoint {saved_shapes[k]}, expected {expected_shapes[k]}"
    for k in expected_shapes.keys() & saved_shapes.keys()
    if saved_shapes[k] != expected_shapes[k])
  problems = []
  if missing:
    problems.append(_listing("missing from the checkpoint", missing))
  if unexpected:
    problems.append(_listing("in the checkpoint but not in the state", unexpected))
  if mis_shaped:
    problems.append(_listing("different shapes", mis_shaped))
  return problems


class Checkpointer:
  """Periodic, atomic checkpoints of a train state in one directory, keeping the newest `keep`.

  All methods must be called on every process, in the same order (they synchronise processes).

  Args:
    directory: where the step directories live, e.g. `<workdir>/checkpoints`; created if needed.
    keep: number of most recent checkpoints kept on disk (older ones are deleted after a newer
      save completes).
    every_steps: `should_save` is True at positive multiples of this step count (0 disables).
    every_secs: `should_save` is also True once this many seconds have passed since the last save
      or since construction (0 disables).
    default_sharding: sharding given to abstract leaves that have none (default: replicated over
      all devices).
    async_save: write in a background thread; `save` returns once the arrays are copied to host
      memory, so their buffers may be donated right after.
    read_only: only restore: never create, clean up or write anything in `directory`.
    clock: monotonic clock in seconds, injectable for tests.
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      keep: int,
      every_steps: int,
      every_secs: float = 0.0,
      default_sharding: jax.sharding.Sharding | None = None,
      async_save: bool = True,
      read_only: bool = False,
      clock: Callable[[], float] = time.monotonic,
  ):
    if keep < 1:
      raise ValueError(f"keep must be at least 1, got {keep}")
    if every_steps < 0 or every_secs < 0:
      raise ValueError(f"every_steps and every_secs must be >= 0, got {every_steps}, {every_secs}")
    self._every_steps = every_steps
    self._every_secs = every_secs
    self._default_sharding = default_sharding or replicated_sharding()
    self._clock = clock
    self._last_save_time = clock()
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),  # Replaces max_to_keep.
      # Leftovers of saves that were killed midway; a reader (sampling or evaluation next to a
      # running training job) must not delete the save in flight.
      cleanup_tmp_directories=not read_only,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save,
    )
    # An explicit registry lets a fresh manager read metadata before its first save or restore.
    registry = ocp.handlers.create_default_handler_registry(
      default=ocp.handlers.StandardCheckpointHandler())
    self._manager = ocp.CheckpointManager(
      os.fspath(directory), options=options, handler_registry=registry)

  @property
  def directory(self) -> str:
    """The checkpoint directory."""
    return os.fspath(self._manager.directory)

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints on disk (including a save still in flight), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is no checkpoint."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `step` is due: a multiple of `every_steps`, or `every_secs` since the last save.

    Steps at or before the latest checkpoint are never due. With several processes, process 0's
    time decision is broadcast, so all processes agree.
    """
    latest = self.latest_step()
    if latest is not None and step <= latest:
      return False
    if self._every_steps and step > 0 and step % self._every_steps == 0:
      return True
    if not self._every_secs:
      return False
    due = self._clock() - self._last_save_time >= self._every_secs
    if jax.process_count() > 1:
      due = bool(multihost_utils.broadcast_one_to_all(np.bool_(due)))
    return due

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Saves `state` as `step` when `should_save(step)` (or `force`); returns whether it did.

    An existing step is never overwritten. Raises `NonFiniteStateError` (writing nothing) when a
    floating-point leaf holds NaN or Inf, so a diverged run cannot rotate out good checkpoints.
    With async saving the write finishes in the background: call `wait_until_finished` or
    `close` before exiting.
    """
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists; not saving it again.", step)
      return False
    if not force and not self.should_save(step):
      return False
    if not is_finite(state):
      raise NonFiniteStateError(
        f"Refusing to save step {step}: the train state contains NaN or Inf values. The "
        f"checkpoints in {self.directory} were left untouched; restart from the latest one, "
        "e.g. with a lower learning rate.")
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._last_save_time = self._clock()
    return True

  def restore(self, abstract_state: State, step: int | None = None) -> State:
    """Restores `step` (default: the latest) onto the layout described by `abstract_state`.

    Args:
      abstract_state: the state's tree of `jax.ShapeDtypeStruct` (see `abstract_state()`) or of
        arrays; each leaf's sharding (or the default sharding) says where its value goes, so the
        checkpoint may come from another device or process count.
      step: the step to restore; None for the latest.
    Returns:
      The state, with the structure of `abstract_state` and the saved values (cast to its dtypes).
    Raises:
      FileNotFoundError: no such checkpoint.
      IncompatibleCheckpointError: the checkpoint's names or shapes differ from `abstract_state`.
    """
    self._manager.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint found in {self.directory}.")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
        f"No checkpoint for step {step} in {self.directory}; available: {self.all_steps()}.")
    target = _with_sharding(abstract_state, self._default_sharding)
    self._check_compatible(step, target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def restore_or_init(self, init_fn: Callable[[], State]) -> tuple[State, bool]:
    """The latest checkpoint if there is one, else `init_fn()`; and whether it was restored.

    `init_fn` should build the state with its final shardings (e.g. jitted with `out_shardings`);
    it is only traced, not run, when a checkpoint exists.
    """
    if self.latest_step() is None:
      return init_fn(), False
    return self.restore(abstract_state(init_fn, self._default_sharding)), True

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight, if any, is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending writes and deletions and releases Orbax's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  def _check_compatible(self, step: int, target: PyTree) -> None:
    """Raises IncompatibleCheckpointError unless the saved tree matches `target` (reads only)."""
    path = os.path.join(self.directory, str(step))
    advice = (
      "Nothing was changed on disk. To train this config from scratch, use a fresh --workdir; "
      "to resume this run, use the config it was started with.")
    try:
      metadata = self._manager.item_metadata(step)
      saved_tree = metadata.tree  # type: ignore[union-attr]
    except Exception as e:  # Unreadable, or written by something other than this class.
      raise IncompatibleCheckpointError(
        f"Cannot read the checkpoint metadata in {path} ({type(e).__name__}: {e}). {advice}"
      ) from e
    problems = _compatibility_problems(saved_tree, target)
    if problems:
      raise IncompatibleCheckpointError(
        f"The checkpoint in {path} does not match the train state of the current config "
        "(it was probably written with another model config):\n" + "\n".join(problems) +
        f"\n{advice}")
