"""Saving and restoring the train state with Orbax: atomic, asynchronous, verified, layout-free.

One `Checkpointer` owns `<workdir>/checkpoints`. Each save is a step directory that Orbax writes
under a temporary name and renames when complete, so a run killed at any instant (kill -9
included) leaves the last completed save readable; leftover temporary directories are ignored and
deleted by the next `Checkpointer` on that directory. Old steps are deleted only after a newer one
is complete.

Arrays are stored as global arrays, so a checkpoint restores onto any device or process count: the
caller's abstract state (shapes, dtypes and the *current* shardings) decides the layout. Every
method must be called on all processes of a multi-host job, in the same order; Orbax coordinates
the writes and process 0 alone writes the shared metadata.

Integrity. Orbax and TensorStore check no checksum of the array data (zarr3's crc32c covers only
a shard index), so each save records a checksum of every leaf in the step's metadata
(`_CHECKPOINT_METADATA`) and each restore verifies them. A checkpoint whose metadata or array files
are missing, truncated or altered raises `CorruptCheckpointError`; `restore_or_init` then moves it
aside to `<directory>_corrupt/<step>` (never deleting it), says so in one warning, and resumes from
the newest intact step. A save that fails (also in Orbax's background thread) raises
`CheckpointSaveError` at the next call, and at every call after it.

Typical use in a train loop::

  with Checkpointer(workdir / "checkpoints", keep=3, every_steps=5000, every_secs=3600) as ckpt:
    state, resumed = ckpt.restore_or_init(init_fn)
    for step in range(int(state.step), num_steps):
      state = train_step(state, batch)
      ckpt.save(step + 1, state)  # saves only when should_save(step + 1); call on all processes
    ckpt.save(num_steps, state, force=True)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from ddpm_jax import file_io, parallel

State = TypeVar("State")
PyTree = Any
T = TypeVar("T")

_MAX_LISTED_KEYS = 10
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's per-step metadata, with custom_metadata.
_CHECKSUMS_KEY = "ddpm_jax_checksums"
_CHECKSUM_ALGORITHM = "sum of fmix32(word ^ position * 0x9E3779B9) mod 2**32, per leaf"
# TensorStore status codes of missing, truncated or undecodable files (transient ones such as
# UNAVAILABLE or DEADLINE_EXCEEDED are not corruption: those errors propagate unchanged).
_CORRUPTION_CODES = (
  "NOT_FOUND",
  "OUT_OF_RANGE",
  "DATA_LOSS",
  "FAILED_PRECONDITION",
  "INVALID_ARGUMENT",
)


class IncompatibleCheckpointError(ValueError):
  """A checkpoint's tree (names or shapes) does not match the state being restored."""


class NonFiniteStateError(ValueError):
  """`Checkpointer.save` was given a state with NaN or Inf values; nothing was written."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint's files are damaged: metadata or array files missing, truncated or unreadable,
  or values that differ from the checksums recorded when it was saved.

  Attributes:
    step: the checkpoint's step.
    reason: what is wrong with it, in a few words.
  """

  def __init__(self, message: str, *, step: int, reason: str):
    super().__init__(message)
    self.step = step
    self.reason = reason


class CheckpointSaveError(RuntimeError):
  """A save failed (e.g. disk full, no permission); no checkpoint of its step was completed."""


def replicated_sharding(devices: list[jax.Device] | None = None) -> NamedSharding:
  """Replicated sharding over a 1-D mesh (axis 'data') of `devices` (default: all devices)."""
  return parallel.replicated(parallel.make_mesh(devices))


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


# -- Checksums. ---------------------------------------------------------------------------------


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as a flat uint32 vector: one word per element (two for 64-bit types)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.reshape(-1).astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser: a bijection of uint32 that spreads every input bit over the word."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


@jax.jit
def _leaf_summary(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(no NaN or Inf in `x`, checksum of `x`), two scalars.

  The checksum is the wrapping uint32 sum over the words w_i of `x` of fmix32(w_i ^ hash(i)).
  Changing one word (any flipped bit) changes exactly one term, and a bijection never maps two
  words to the same term, so it always changes the checksum; the position hash makes moved or
  swapped values count too.
  """
  words = _words(x)
  position = jax.lax.iota(jnp.uint32, words.size) * jnp.uint32(0x9E3779B9)
  checksum = jnp.sum(_fmix32(words ^ position), dtype=jnp.uint32)
  inexact = jnp.issubdtype(x.dtype, jnp.inexact)
  finite = jnp.all(jnp.isfinite(x)) if inexact else jnp.array(True)
  return finite, checksum


def _summaries(tree: PyTree) -> tuple[bool, dict[str, list]]:
  """(whether every leaf is finite, leaf name -> [dtype, checksum]) of `tree`.

  Computed leaf by leaf (a program per shape, not one per tree) on one device's copy of each
  replicated leaf, so no device communicates and every process gets the same answer.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  names, dtypes, results = [], [], []
  for path, leaf in flat:
    leaf = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
    local = leaf.addressable_data(0) if leaf.is_fully_replicated else leaf
    names.append(_path_name(path))
    dtypes.append(str(leaf.dtype))
    results.append(_leaf_summary(local))
  fetched = jax.device_get(results)
  finite = all(bool(f) for f, _ in fetched)
  return finite, {n: [d, int(c)] for n, d, (_, c) in zip(names, dtypes, fetched, strict=True)}


def checksums(tree: PyTree) -> dict[str, int]:
  """Leaf name ('params/conv/kernel') -> the checksum `Checkpointer.save` records for it."""
  return {name: value for name, (_, value) in _summaries(tree)[1].items()}


# -- Trees and errors. --------------------------------------------------------------------------


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


def _path_name(path: tuple[Any, ...]) -> str:
  """'params/conv/kernel': dataclass fields, dict keys and NamedTuple fields all map to the same
  name, as Orbax stores them all as dicts."""
  return "/".join(_key_name(k) for k in path)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...] | None]:
  """Leaf name -> shape."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    _path_name(path): (tuple(leaf.shape) if getattr(leaf, "shape", None) is not None else None)
    for path, leaf in flat
  }


def _save_decision_policy(
  every_steps: int, every_secs: float
) -> ocp.checkpoint_managers.SaveDecisionPolicy:
  policies = []
  if every_steps:
    policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(every_steps))
  if every_secs:
    policies.append(
      ocp.checkpoint_managers.ContinuousCheckpointingPolicy(minimum_interval_secs=every_secs)
    )
  return ocp.checkpoint_managers.AnySavePolicy(policies)


def _listing(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED_KEYS]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def _compatibility_problems(saved: PyTree, expected: PyTree, partial: bool = False) -> list[str]:
  """Human-readable differences between the saved metadata tree and the expected state (a part
  of it when `partial`: the saved leaves it does not name are not differences)."""
  saved_shapes, expected_shapes = _flat_shapes(saved), _flat_shapes(expected)
  missing = sorted(expected_shapes.keys() - saved_shapes.keys())
  unexpected = [] if partial else sorted(saved_shapes.keys() - expected_shapes.keys())
  mis_shaped = sorted(
    f"{k}: checkpoint {saved_shapes[k]}, expected {expected_shapes[k]}"
    for k in expected_shapes.keys() & saved_shapes.keys()
    if saved_shapes[k] != expected_shapes[k]
  )
  problems = []
  if missing:
    problems.append(_listing("missing from the checkpoint", missing))
  if unexpected:
    problems.append(_listing("in the checkpoint but not in the state", unexpected))
  if mis_shaped:
    problems.append(_listing("different shapes", mis_shaped))
  return problems


def _root_cause(error: BaseException) -> BaseException:
  """The end of the `raise ... from` chain (not `__context__`: what was being handled then)."""
  while error.__cause__ is not None:
    error = error.__cause__
  return error


def _reason(error: BaseException) -> str:
  """The root cause of `error` in one line of at most ~300 characters (TensorStore specs cut)."""
  root = _root_cause(error)
  lines = str(root).strip().splitlines()
  text = lines[0] if lines else type(root).__name__
  for marker in (" [tensorstore_spec=", " [source locations="):
    text = text.split(marker)[0]
  return text if len(text) <= 300 else f"{text[:150]} ... {text[-150:]}"


def _is_corruption(error: BaseException) -> bool:
  """Whether `error` (from reading a checkpoint) says its files are missing or damaged."""
  root = _root_cause(error)
  if isinstance(
    root,
    (FileNotFoundError, NotADirectoryError, EOFError, UnicodeDecodeError, json.JSONDecodeError),
  ):
    return True
  return str(root).startswith(_CORRUPTION_CODES)


def _error_code(error: Exception | None) -> int:
  if error is None:
    return 0
  return 1 if isinstance(error, CorruptCheckpointError) else 2


def _lost_steps(first: int, last: int) -> str:
  return f"step {last}" if first == last else f"steps {first}..{last}"


class Checkpointer:
  """Periodic, atomic checkpoints of a train state in one directory, keeping the newest `keep`.

  All methods must be called on every process, in the same order (they synchronise processes).

  Args:
    directory: where the step directories live, e.g. `<workdir>/checkpoints`; created if needed.
      A relative local path is made absolute (Orbax requires it); gs:// paths stay as they are.
    keep: number of most recent checkpoints kept on disk (older ones are deleted after a newer
      save completes).
    every_steps: `should_save` is True at positive multiples of this step count (0 disables).
    every_secs: `should_save` is also True once this many seconds have passed since the latest
      checkpoint was saved, or at once when there is none (0 disables).
    default_sharding: sharding given to abstract leaves that have none (default: replicated over
      all devices).
    async_save: write in a background thread; `save` returns once the arrays are copied to host
      memory, so their buffers may be donated right after.
    read_only: only restore: never create, clean up, move or write anything in `directory`.

  The save decisions are Orbax's policies (`FixedIntervalPolicy`, and
  `ContinuousCheckpointingPolicy` with a minimum interval, whose time decision process 0 takes
  for all processes).
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
  ):
    if keep < 1:
      raise ValueError(f"keep must be at least 1, got {keep}")
    if every_steps < 0 or every_secs < 0:
      raise ValueError(f"every_steps and every_secs must be >= 0, got {every_steps}, {every_secs}")
    self._default_sharding = default_sharding or replicated_sharding()
    self._read_only = read_only
    self._in_flight: int | None = None  # The step of the last save not yet known to be complete.
    self._save_error: CheckpointSaveError | None = None
    self._told_unverified = False
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),  # Replaces max_to_keep.
      # Leftovers of saves that were killed midway; a reader (sampling or evaluation next to a
      # running training job) must not delete the save in flight.
      cleanup_tmp_directories=not read_only,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save,
      save_decision_policy=_save_decision_policy(every_steps, every_secs),
    )
    # An explicit registry lets a fresh manager read metadata before its first save or restore;
    # PyTreeRestore reads a part of a saved state (`restore_part`).
    registry = ocp.handlers.create_default_handler_registry(
      default=ocp.handlers.StandardCheckpointHandler()
    )
    registry.add("default", ocp.args.PyTreeRestore, ocp.handlers.PyTreeCheckpointHandler())
    self._manager = ocp.CheckpointManager(
      file_io.absolute(directory), options=options, handler_registry=registry
    )

  @property
  def directory(self) -> str:
    """The checkpoint directory (absolute)."""
    return os.fspath(self._manager.directory)

  @property
  def corrupt_directory(self) -> str:
    """Where `restore_or_init` moves corrupt checkpoints: `<directory>_corrupt`."""
    return self.directory.rstrip("/") + "_corrupt"

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints on disk (including a save still in flight), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is no checkpoint."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `step` is due: a multiple of `every_steps`, or `every_secs` since the latest save.

    Steps at or before the latest checkpoint are never due. With several processes, process 0's
    time decision holds for all. Raises CheckpointSaveError when an earlier save failed.
    """
    self._raise_if_a_save_failed(wait=False)
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """With several processes, whether JAX's coordination service has received a preemption
    notice and `step` is the step at which all of them stop (call at every step)."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Saves `state` as `step` when `should_save(step)` (or `force`); returns whether it did.

    An existing step is never overwritten. Records a checksum of every leaf in the step's
    metadata. Raises `NonFiniteStateError` (writing nothing) when a floating-point leaf holds NaN
    or Inf, so a diverged run cannot rotate out good checkpoints, and `CheckpointSaveError` when
    this save or an earlier one failed. With async saving the write finishes in the background:
    call `wait_until_finished` or `close` before exiting.
    """
    self._raise_if_a_save_failed(wait=False)
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists; not saving it again.", step)
      return False
    if not force and not self.should_save(step):
      return False
    finite, leaf_checksums = _summaries(state)
    if not finite:
      raise NonFiniteStateError(
        f"Refusing to save step {step}: the train state contains NaN or Inf values. The "
        f"checkpoints in {self.directory} were left untouched; restart from the latest one, "
        "e.g. with a lower learning rate."
      )
    self._raise_if_a_save_failed(wait=True)  # Orbax would wait for the previous save anyway.
    record = {"algorithm": _CHECKSUM_ALGORITHM, "leaves": leaf_checksums}
    try:
      self._manager.save(
        step,
        args=ocp.args.StandardSave(state),
        force=True,
        custom_metadata={_CHECKSUMS_KEY: record},
      )
    except Exception as e:
      self._save_failed(step, e)
    self._in_flight = step
    return True

  def restore(self, abstract_state: State, step: int | None = None) -> State:
    """Restores `step` (default: the latest) onto the layout described by `abstract_state`.

    Args:
      abstract_state: the state's tree of `jax.ShapeDtypeStruct` (see `abstract_state()`) or of
        arrays; each leaf's sharding (or the default sharding) says where its value goes, so the
        checkpoint may come from another device or process count.
      step: the step to restore; None for the latest.
    Returns:
      The state, with the structure of `abstract_state` and the saved values (cast to its dtypes),
      verified against the checksums recorded at save time (checkpoints written before those were
      recorded restore unverified).
    Raises:
      FileNotFoundError: no such checkpoint.
      IncompatibleCheckpointError: the checkpoint's names or shapes differ from `abstract_state`.
      CorruptCheckpointError: the checkpoint's files are damaged (nothing is changed on disk).
    """
    self._raise_if_a_save_failed(wait=True)
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint found in {self.directory}.")
    return self._restore(step, abstract_state, partial=False)

  def restore_part(self, abstract_part: dict[str, PyTree], step: int) -> dict[str, PyTree]:
    """Some top-level fields of the state saved as `step`, read alone (the rest is not read) and
    verified like `restore`: e.g. `{"ema_params": abstract params}` gives the EMA params without
    the optimizer state. Raises as `restore` does."""
    self._raise_if_a_save_failed(wait=True)
    return self._restore(step, abstract_part, partial=True)

  def _restore(self, step: int, abstract: PyTree, *, partial: bool) -> PyTree:
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
        f"No checkpoint for step {step} in {self.directory}; available: {self.all_steps()}."
      )
    target = _with_sharding(abstract, self._default_sharding)
    record, state = self._agreed(step, lambda: self._read(step, target, partial))
    self._agreed(step, lambda: self._verify(step, state, record))
    return state

  def restore_or_init(self, init_fn: Callable[[], State]) -> tuple[State, bool]:
    """The newest intact checkpoint if there is one, else `init_fn()`; and whether it restored.

    `init_fn` should build the state with its final shardings (e.g. jitted with `out_shardings`);
    it is only traced, not run, when a checkpoint restores. A checkpoint that is corrupt (see
    `CorruptCheckpointError`) is moved to `corrupt_directory` (never deleted), so that later
    saves, `should_save` and the rotation of old steps see only intact ones; one warning names it
    and the steps lost, and the next older one is tried. Read-only: raises CorruptCheckpointError
    instead. IncompatibleCheckpointError and other errors propagate, changing nothing.
    """
    steps = self.all_steps()
    if not steps:
      return init_fn(), False
    abstract = abstract_state(init_fn, self._default_sharding)
    corrupt: list[CorruptCheckpointError] = []
    for step in reversed(steps):
      try:
        state = self.restore(abstract, step)
      except CorruptCheckpointError as e:
        if self._read_only:
          raise
        corrupt.append(e)
        continue
      self._set_aside(corrupt, resumed=step)
      return state, True
    self._set_aside(corrupt, resumed=None)
    return init_fn(), False

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight, if any, is complete on disk; CheckpointSaveError if a
    save failed."""
    self._raise_if_a_save_failed(wait=True)

  def close(self) -> None:
    """Finishes pending writes and deletions and releases Orbax's resources; raises
    CheckpointSaveError if a save failed."""
    try:
      self._raise_if_a_save_failed(wait=True)
    finally:
      try:
        self._manager.close()
      except Exception:
        if self._save_error is None:  # Else Orbax re-raises the failure already reported.
          raise

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
    try:
      self.close()
    except CheckpointSaveError as e:
      if exc is None:
        raise
      if e is not exc:  # Another error is on its way out; do not hide either.
        logging.error("%s", e)

  # -- Failed saves. ----------------------------------------------------------------------------

  def _raise_if_a_save_failed(self, *, wait: bool) -> None:
    """Raises CheckpointSaveError if a save failed; without `wait`, a save still in flight is left
    to finish (its outcome is checked at a later call)."""
    if self._save_error is not None:
      raise self._save_error
    if self._in_flight is None or (not wait and self._manager.is_saving_in_progress()):
      return
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._save_failed(step, e)

  def _save_failed(self, step: int, error: Exception) -> NoReturn:
    """Records and raises the CheckpointSaveError of `step` (at this call and every later one)."""
    try:
      self._manager.reload()  # What is complete on disk, without the failed step.
      latest = self.latest_step()
    except Exception:  # The directory itself may be unreadable.
      latest = None
    kept = (
      "there is no complete checkpoint there yet"
      if latest is None
      else f"the latest complete checkpoint there is step {latest}"
    )
    self._save_error = CheckpointSaveError(
      f"Saving step {step} to {self.directory} failed: {_reason(error)}. Stopping rather than "
      f"going on without checkpoints: {kept} (the failed save left only a temporary directory, "
      "which is never restored and is removed by the next run). Fix the cause (disk space, "
      "permissions, the path) and rerun the same command to resume."
    )
    raise self._save_error from error

  # -- Reading and verifying. -------------------------------------------------------------------

  def _step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _corrupt(self, step: int, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
      f"The checkpoint of step {step} ({self._step_path(step)}) is corrupt: {reason}.",
      step=step,
      reason=reason,
    )

  def _agreed(self, step: int, fn: Callable[[], T]) -> T:
    """`fn()`; with several processes, all raise when it raised on any, so all take one path."""
    try:
      result, error = fn(), None
    except Exception as e:  # Re-raised below, on every process.
      result, error = None, e
    if jax.process_count() > 1:
      worst = int(np.max(multihost_utils.process_allgather(np.int32(_error_code(error)))))
      if error is None and worst == 1:
        error = self._corrupt(step, "it failed to restore on another process (see its log)")
      elif error is None and worst == 2:
        error = RuntimeError(
          f"Restoring step {step} from {self.directory} failed on another process; see its log."
        )
    if error is not None:
      raise error
    return result  # type: ignore[return-value]

  def _read(self, step: int, target: PyTree, partial: bool) -> tuple[dict | None, PyTree]:
    """(The checksum record or None, the restored state or part); raises
    CorruptCheckpointError."""
    record = self._checksum_record(step)
    self._check_compatible(step, target, partial)
    if partial:
      args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      )
    else:
      args = ocp.args.StandardRestore(target)
    try:
      state = self._manager.restore(step, args=args)
    except Exception as e:
      if not _is_corruption(e):
        raise
      raise self._corrupt(step, f"an array file is missing or unreadable ({_reason(e)})") from e
    return record, state

  def _checksum_record(self, step: int) -> dict | None:
    """The checksums recorded at save time (None for checkpoints written before they were)."""
    path = epath.Path(self._step_path(step)) / _STEP_METADATA_FILE
    try:
      metadata = json.loads(path.read_text())
    except FileNotFoundError as e:
      raise self._corrupt(step, f"its metadata file {_STEP_METADATA_FILE} is missing") from e
    except ValueError as e:
      raise self._corrupt(step, f"its metadata file {_STEP_METADATA_FILE} is unreadable") from e
    custom = metadata.get("custom_metadata") if isinstance(metadata, dict) else None
    record = (custom or {}).get(_CHECKSUMS_KEY)
    return record if isinstance(record, dict) else None

  def _verify(self, step: int, state: PyTree, record: dict | None) -> None:
    """Raises CorruptCheckpointError when a restored leaf differs from its recorded checksum."""
    if record is None or record.get("algorithm") != _CHECKSUM_ALGORITHM:
      if not self._told_unverified:
        logging.warning(
          "The checkpoint of step %d in %s has no checksums (written before they "
          "were recorded); restored without verifying its values.",
          step,
          self.directory,
        )
        self._told_unverified = True
      return
    saved = record.get("leaves", {})
    _, restored = _summaries(state)
    # A leaf restored to another dtype than it was saved with cannot be compared.
    bad = sorted(
      name
      for name, (dtype, value) in restored.items()
      if name in saved and saved[name][0] == dtype and saved[name][1] != value
    )
    if bad:
      shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
      raise self._corrupt(
        step,
        f"the values of {len(bad)} of its {len(restored)} arrays differ from the checksums "
        f"recorded when it was saved ({shown})",
      )

  def _check_compatible(self, step: int, target: PyTree, partial: bool = False) -> None:
    """Raises IncompatibleCheckpointError unless the saved tree matches `target` (reads only);
    CorruptCheckpointError when the tree metadata is missing or unreadable."""
    try:
      metadata = self._manager.item_metadata(step)
    except Exception as e:
      if not _is_corruption(e):
        raise
      raise self._corrupt(step, f"its tree metadata is unreadable ({_reason(e)})") from e
    saved_tree = getattr(metadata, "tree", None)
    if saved_tree is None:
      raise self._corrupt(step, "its tree metadata (default/_METADATA) is missing or unreadable")
    problems = _compatibility_problems(saved_tree, target, partial)
    if problems:
      raise IncompatibleCheckpointError(
        f"The checkpoint in {self._step_path(step)} does not match the train state of the current "
        "config (it was probably written with another model config):\n"
        + "\n".join(problems)
        + "\nNothing was changed on disk. To train this config from scratch, use a fresh "
        "--workdir; to resume this run, use the config it was started with."
      )

  # -- Setting corrupt checkpoints aside. -------------------------------------------------------

  def _set_aside(self, corrupt: list[CorruptCheckpointError], resumed: int | None) -> None:
    """Moves the `corrupt` checkpoints (newest first) out of Orbax's view, then warns once."""
    if not corrupt:
      return
    moved = [self._move_aside(e.step) for e in corrupt] if jax.process_index() == 0 else []
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ddpm_jax_checkpointing_set_aside")
    self._manager.reload()
    if jax.process_index() != 0:
      return
    steps = ", ".join(str(e.step) for e in corrupt)
    reasons = "; ".join(f"step {e.step}: {e.reason}" for e in corrupt)
    first = 0 if resumed is None else resumed
    restart = (
      "No intact checkpoint is left, so this run starts from scratch"
      if resumed is None
      else f"Resuming from step {resumed}, the newest intact one"
    )
    logging.warning(
      "Corrupt checkpoint%s %s in %s (%s); moved to %s (not deleted). %s: %s will be trained "
      "again.",
      "s" if len(corrupt) > 1 else "",
      steps,
      self.directory,
      reasons,
      ", ".join(moved),
      restart,
      _lost_steps(first + 1, corrupt[0].step),
    )

  def _move_aside(self, step: int) -> str:
    """Renames the step directory to `<corrupt_directory>/<step>` (or `<step>_2`, ... if taken)."""
    parent = epath.Path(self.corrupt_directory)
    parent.mkdir(parents=True, exist_ok=True)
    target, n = parent / str(step), 2
    while target.exists():
      target, n = parent / f"{step}_{n}", n + 1
    epath.Path(self._step_path(step)).rename(target)
    return os.fspath(target)
