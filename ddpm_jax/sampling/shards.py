"""`--mode=sample`: many EMA samples of a checkpoint, over every device, resumable by rerunning.

`run_sampling(config, workdir)` restores the EMA parameters of the latest checkpoint (or of
`sample.checkpoint_step`), draws `sample.num_samples` images in global batches of
`sample.batch_size` spread over all devices of all processes, and writes them as it goes::

  <workdir>/samples_step<step>_<sampler>_<num_steps>steps[_eta<eta>]_seed<seed>[_noclip]_<key>/
    manifest.json     everything that determines the images (checkpoint step, sampler, seed,
                      diffusion, model, image shape); <key> is its hash
    shard_00000.npz   images uint8 [b, H, W, C], indices int64 [b] (the global sample indices)
    shard_00001.npz   ...  (shard k holds samples k * batch_size .. (k + 1) * batch_size - 1)
    grid.png          the first 64 samples

Sample i is drawn from the key fold_in(PRNGKey(sample.seed), i) (`sampling.sample_keys`), so the
images do not depend on the batch size, the device count or the process count. Process 0 writes
each shard atomically (temporary file, then rename) with fixed zip timestamps, so a shard's bytes
are a function of the config and the checkpoint; a rerun skips the shards that hold exactly the
expected indices, shape and dtype (which is how a preempted job continues) and regenerates any
other. Another config (beta schedule, image size, model, ...) has another directory, so a rerun
never returns stale samples. `load_samples(directory)` reads them back in order.

Samplers (`sample.sampler`):
  ancestral: Algorithm 2 through all T steps with the model's variance (`p_sample_loop`). With
    `sample.num_steps` < T it is the strided ancestral sampler: DDIM with eta = 1 on num_steps
    evenly spaced steps, whose variance is the posterior variance of the strided chain (it equals
    the `fixedsmall` ancestral sampler at num_steps = T, not `fixedlarge`).
  ddim: DDIM (Song et al. 2021) on `sample.num_steps` steps with `sample.eta` (0: deterministic).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import file_io, image_grid, model_bundle
from ddpm_jax.checkpoints import readers
from ddpm_jax.config.validation import validate_config
from ddpm_jax.model_bundle import ModelBundle
from ddpm_jax.sampling.samplers import SamplerSpec, make_sample_fn, sample_keys, sample_labels

SHARD_PATTERN = "shard_*.npz"
GRID_NAME = "grid.png"
MANIFEST_NAME = "manifest.json"
GRID_SIZE = 64
# Fixed zip timestamps make a shard's bytes depend only on its arrays.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


# -- The sample directory. ---------------------------------------------------------------------


class StaleSamplesError(ValueError):
  """A sample directory holds samples of other settings than those asked for."""


def sample_manifest(
  config: ml_collections.ConfigDict, spec: SamplerSpec, step: int
) -> dict[str, Any]:
  """Everything that determines the images of a sample directory (not the batch size or the
  number of samples: sample i is the same in every run)."""
  manifest = {
    "checkpoint_step": step,
    "sampler": dataclasses.asdict(spec),
    "seed": config.sample.seed,
    "image_shape": list(model_bundle.image_shape(config)),
    "diffusion": config.diffusion.to_dict(),
    "model": config.model.to_dict(),
  }
  if config.model.num_classes:
    manifest["guidance_scale"] = config.sample.guidance_scale
    manifest["class_label"] = config.sample.class_label
  return manifest


def _manifest_json(manifest: dict[str, Any]) -> str:
  return json.dumps(manifest, indent=2, sort_keys=True, default=list)


def sample_dir(workdir: str, manifest: dict[str, Any]) -> str:
  """`<workdir>/<SamplerSpec.dirname>_<key>`, key a hash of the manifest."""
  key = hashlib.sha256(_manifest_json(manifest).encode()).hexdigest()[:8]
  spec = SamplerSpec(**manifest["sampler"])
  return os.path.join(
    workdir, f"{spec.dirname(manifest['checkpoint_step'], manifest['seed'])}_{key}"
  )


def _check_or_write_manifest(directory: str, manifest: dict[str, Any]) -> None:
  """Process 0: writes the manifest, or checks that the one there is the same."""
  path = os.path.join(directory, MANIFEST_NAME)
  text = _manifest_json(manifest)
  if file_io.exists(path):
    if file_io.read_text(path) == text:
      return
    raise StaleSamplesError(
      f"{directory} holds samples of other settings than these (its {MANIFEST_NAME} differs); "
      "nothing was changed. Move it away, or sample into another directory."
    )
  file_io.write_atomically(path, text.encode())


# -- Shards on disk. ---------------------------------------------------------------------------


def shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"shard_{index:05d}.npz")


def shard_ranges(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
  """(start, count) of each shard: consecutive sample indices, batch_size per shard."""
  return [(s, min(batch_size, num_samples - s)) for s in range(0, num_samples, batch_size)]


def _npz_bytes(**arrays: np.ndarray) -> bytes:
  """An .npz archive (what np.savez writes) with fixed timestamps: equal arrays, equal bytes."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
    for name, array in arrays.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE_TIME)
      with archive.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
  return buffer.getvalue()


def _read_shard(path: str) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(file_io.read_bytes(path)), allow_pickle=False) as npz:
    return {name: npz[name] for name in npz.files if name in ("images", "indices", "labels")}


# (start, count) -> the labels `[count]` of those samples (class-conditional models), or None.
LabelsFn = Callable[[int, int], np.ndarray] | None


def _shard_complete(
  path: str, start: int, count: int, image_shape: tuple[int, ...], labels_fn: LabelsFn
) -> bool:
  """Whether `path` holds exactly samples start..start+count-1: readable, the right indices
  (int64), images uint8 `[count, *image_shape]`, and (conditional) their labels."""
  if not file_io.exists(path):
    return False
  try:
    shard = _read_shard(path)
    images, indices = shard["images"], shard["indices"]
  except Exception:  # noqa: BLE001 - any unreadable shard (empty, truncated, ...) is redone.
    return False
  expected = np.arange(start, start + count)
  labelled = labels_fn is None or np.array_equal(shard.get("labels"), labels_fn(start, count))
  return (
    images.dtype == np.uint8
    and images.shape == (count, *image_shape)
    and indices.dtype == np.int64
    and np.array_equal(indices, expected)
    and labelled
  )


def _pending_shards(
  directory: str,
  ranges: list[tuple[int, int]],
  image_shape: tuple[int, ...],
  labels_fn: LabelsFn = None,
) -> list[int]:
  """Indices of the shards still to sample; process 0's view of the disk decides for all."""
  pending = np.zeros(len(ranges), np.bool_)
  if jax.process_index() == 0:
    pending[:] = [
      not _shard_complete(shard_path(directory, i), *r, image_shape, labels_fn)
      for i, r in enumerate(ranges)
    ]
  if jax.process_count() > 1:
    pending = np.asarray(multihost_utils.broadcast_one_to_all(pending))
  return [int(i) for i in np.flatnonzero(pending)]


def load_samples(directory: str, num_samples: int | None = None) -> np.ndarray:
  """The samples of a `run_sampling` directory in index order, uint8 `[N, H, W, C]`.

  N = num_samples (reading shards in order only until indices 0..N-1 are all there), or all the
  shards hold when None. Shards of an earlier run with another batch size may overlap; each
  index holds the same image in all of them. Raises FileNotFoundError when an index below N is
  missing (an unfinished run: rerun the sampling to complete it).
  """
  paths = file_io.glob(directory, SHARD_PATTERN)
  shards, have = [], np.zeros(num_samples or 0, np.bool_)
  for path in paths:
    try:
      shards.append(_read_shard(path))
    except Exception:  # noqa: BLE001 - an unreadable shard counts as missing (rerun to redo it).
      logging.warning("Skipping the unreadable shard %s.", path)
      continue
    if num_samples is not None:
      have[shards[-1]["indices"][shards[-1]["indices"] < num_samples]] = True
      if have.all():
        break
  indices = np.concatenate([s["indices"] for s in shards]) if shards else np.zeros(0, np.int64)
  n = num_samples if num_samples is not None else int(indices.max(initial=-1)) + 1
  keep = indices < n
  filled = np.zeros(n, np.bool_)
  filled[indices[keep]] = True
  if n == 0 or not filled.all():
    raise FileNotFoundError(
      f"The samples in {directory} are incomplete: {len(paths)} shards, {int(filled.sum())} of "
      f"samples 0..{n - 1} present. Rerun the sampling to finish them."
    )
  images = np.concatenate([s["images"] for s in shards])[keep]
  out = np.empty((n, *images.shape[1:]), np.uint8)
  out[indices[keep]] = images
  return out


# -- The job. ----------------------------------------------------------------------------------


def run_sampling(
  config: ml_collections.ConfigDict, workdir: str, output_dir: str | None = None
) -> str:
  """Samples `config.sample` from the EMA params of a checkpoint in `workdir`; returns the
  output directory (default `sample_dir`). Rerunning resumes; see top."""
  validate_config(config, mode="sample")
  return sample_checkpoint(ModelBundle.from_config(config), workdir, output_dir)


def labels_of(config: ml_collections.ConfigDict) -> LabelsFn:
  """(start, count) -> the labels of those samples (`samplers.sample_labels`); None for an
  unconditional model."""
  if not config.model.num_classes:
    return None
  return lambda start, count: sample_labels(config.sample, config.model.num_classes, start, count)


def load_labels(directory: str, num_samples: int) -> np.ndarray:
  """The labels `[num_samples]` int32 of samples 0..num_samples-1 of a conditional sample
  directory, in index order."""
  labels = np.full(num_samples, -1, np.int32)
  for path in file_io.glob(directory, SHARD_PATTERN):
    shard = _read_shard(path)
    if "labels" not in shard:
      raise FileNotFoundError(f"{path} holds no labels: it was sampled unconditionally.")
    keep = shard["indices"] < num_samples
    labels[shard["indices"][keep]] = shard["labels"][keep]
  if np.any(labels < 0):
    raise FileNotFoundError(f"The labels of {directory} are incomplete; rerun the sampling.")
  return labels


def sample_checkpoint(bundle: ModelBundle, workdir: str, output_dir: str | None = None) -> str:
  """`run_sampling` for a validated config's bundle (`--mode=eval` samples this way too)."""
  config = bundle.config
  workdir = file_io.absolute(workdir)
  spec = SamplerSpec.from_config(config.sample, bundle.diffusion.num_timesteps)
  ranges = shard_ranges(config.sample.num_samples, config.sample.batch_size)
  labels_fn = labels_of(config)
  with readers.open_checkpoints(workdir) as ckpt:
    step = readers.select_step(ckpt, config.sample.checkpoint_step)
    manifest = sample_manifest(config, spec, step)
    directory = file_io.absolute(output_dir) if output_dir else sample_dir(workdir, manifest)
    if jax.process_index() == 0:
      file_io.make_writable_dir(directory, "The sample directory")
      _check_or_write_manifest(directory, manifest)
    pending = _pending_shards(directory, ranges, bundle.image_shape, labels_fn)
    logging.info(
      "Sampling step %d with %s into %s: %d of %d shards to do.",
      step,
      spec,
      directory,
      len(pending),
      len(ranges),
    )
    if pending:
      ema_params = readers.restore_ema_params(ckpt, bundle.abstract_params(), step)
  if pending:
    sample_fn = make_sample_fn(
      bundle.diffusion,
      bundle.model,
      bundle.mesh,
      bundle.image_shape,
      spec,
      config.sample.batch_size,
      config.sample.guidance_scale,
    )
    _sample_shards(sample_fn, ema_params, config.sample.seed, directory, ranges, pending, labels_fn)
  grid_path = os.path.join(directory, GRID_NAME)
  if jax.process_index() == 0 and not file_io.exists(grid_path):
    first = load_samples(directory, min(GRID_SIZE, config.sample.num_samples))
    image_grid.save_png(grid_path, image_grid.make_grid(first))
  logging.info("Samples of step %d: %s", step, directory)
  return directory


def _sample_shards(
  sample_fn,
  params,
  seed: int,
  directory: str,
  ranges: list[tuple[int, int]],
  pending: list[int],
  labels_fn: LabelsFn = None,
) -> None:
  """Samples and writes (process 0) the `pending` shards, logging images/s and the ETA."""
  rng = jax.random.PRNGKey(seed)
  start_time, done = time.time(), 0
  for n, index in enumerate(pending):
    start, count = ranges[index]
    labels = labels_fn(start, count) if labels_fn else None
    images = image_grid.to_uint8(sample_fn(params, sample_keys(rng, start, count), labels))
    if jax.process_index() == 0:
      arrays = {"images": images, "indices": np.arange(start, start + count, dtype=np.int64)}
      data = _npz_bytes(**arrays, **({} if labels is None else {"labels": labels}))
      file_io.write_atomically(shard_path(directory, index), data)
    done += count
    rate = done / max(time.time() - start_time, 1e-9)
    left = sum(ranges[i][1] for i in pending[n + 1 :])
    logging.info(
      "Wrote shard %d (%d/%d pending shards): %.1f images/s, ETA %.0f s.",
      index,
      n + 1,
      len(pending),
      rate,
      left / rate,
    )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sampling_done")
