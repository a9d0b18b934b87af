"""Bits/dim of the eval split under the full variational bound (the paper's NLL, Table 1), with
the rate-distortion curve of Table 4 / Fig. 5; the whole job of `--mode=eval`.

`run_bpd_eval(config, workdir)` restores the EMA params of the latest checkpoint (or `step`),
runs `calc_bpd_loop` (all T terms, clip_denoised=True as in the original) on
`data.eval_split` (its first `eval.num_examples`; -1 = all) in global batches of
`eval.batch_size` spread over every device of every process, and writes, from process 0 only:

  <workdir>/eval_<step>/bpd/meta.json        the layout the chunks were computed with
  <workdir>/eval_<step>/bpd/chunk_<k>.npz    global batch k (k zero-padded to 5 digits), per
                                             image: index [n] (position in the split),
                                             total_bpd, prior_bpd [n], terms_bpd, mse [n, T]
  <workdir>/eval_<step>/bpd.json             n, mean, stderr, prior/decoder/per-term means,
                                             the rate-distortion table
  <workdir>/eval_<step>/bpd_per_image.csv    index,total_bpd,prior_bpd,decoder_bpd
  <workdir>/eval_<step>/rate_distortion.csv  every reverse time, see `rate_distortion`
  <workdir>/eval_<step>/rate_distortion.png  Fig. 5
  <workdir>/eval/                            TensorBoard: eval/bpd, eval/bpd_stderr, ...

Resuming. Each chunk is written atomically once its batch is done; a rerun skips the chunks
that exist, so an interrupted evaluation loses at most one batch. Chunks computed with another
layout (batch size, process count, example count, T, ...) are deleted and recomputed.

Layout independence. Example i of the split (its global index) uses the key
fold_in(PRNGKey(0), i), and `calc_bpd_loop` draws each example's noise from its own key, so
the per-image values do not depend on the batch size or the device or process count.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ddpm_jax import file_io, parallel
from ddpm_jax.config.validation import validate_config
from ddpm_jax.data import pipeline
from ddpm_jax.data.specs import DATASETS
from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.evaluation import rate_distortion
from ddpm_jax.model_bundle import ModelBundle
from ddpm_jax.parallel import AXIS
from ddpm_jax.runtime import xla_flags

SEED = 0  # Example i draws its noise from fold_in(PRNGKey(SEED), i).
PER_IMAGE_FIELDS = ("total_bpd", "prior_bpd", "terms_bpd", "mse")


def eval_dir(workdir: str, step: int) -> str:
  """`<workdir>/eval_<step>`, where the evaluations of the checkpoint of `step` go."""
  return os.path.join(workdir, f"eval_{step}")


# ----------------------------------------------------------------------------- restoring


# ----------------------------------------------------------------------------- the computation


def make_bpd_fn(
  diffusion: GaussianDiffusion,
  model: Any,
  mesh: Mesh,
  rng: jax.Array,
  clip_denoised: bool = True,
) -> Callable[..., dict[str, np.ndarray]]:
  """Returns `bpd(params, images, index, mask) -> dict` over every device and process.

  Each process passes its local batch: images `[b, H, W, C]` in [-1, 1], index `[b]` int (the
  examples' global indices, which choose their keys) and mask `[b]` bool; b must divide by the
  local device count. Returns the global batch as numpy: `total_bpd`, `prior_bpd` `[B]`,
  `terms_bpd`, `mse` `[B, T]` (see `calc_bpd_loop`), and the `index` and `mask` they belong to.
  """

  def per_device(params, images, index, mask):
    def model_fn(x, t):
      return model.apply({"params": params}, x, t, train=False)

    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, index)
    out = diffusion.calc_bpd_loop(model_fn, images, keys, clip_denoised)
    return dict(out, index=index, mask=mask)

  mapped = jax.jit(
    jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P(AXIS)
    ),
    compiler_options=xla_flags.inference_compiler_options(parallel.platform(mesh)),
  )
  sharding = parallel.batch_sharding(mesh)

  def bpd(params, images, index, mask):
    inputs = [
      jax.make_array_from_process_local_data(sharding, np.asarray(x)) for x in (images, index, mask)
    ]
    out = mapped(params, *inputs)
    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(out, tiled=True).items()}

  return bpd


def local_batch_size(global_batch: int) -> int:
  """The per-process batch: `global_batch` over the processes, rounded up to fill every device."""
  per_process = -(-global_batch // jax.process_count())
  devices = jax.local_device_count()
  return -(-per_process // devices) * devices


def _num_eval_examples(config: ml_collections.ConfigDict) -> int:
  total = pipeline.get_dataset_info(config)["num_eval_examples"]
  limit = config.eval.num_examples
  return total if limit < 0 else min(limit, total)


def global_example_index(
  config: ml_collections.ConfigDict,
  local_index: np.ndarray,
  *,
  process_index: int,
  process_count: int,
) -> np.ndarray:
  """Positions in the eval split `[n]` of this process's examples `local_index` `[n]`.

  Mirrors how `pipeline.create_eval_dataset` deals the split: TFDS splits are cut into
  contiguous parts (`tfds.even_splits`, the first n % P parts one longer), TFRecords and image
  folders are dealt round robin.
  """
  local_index = np.asarray(local_index, np.int64)
  if process_count == 1:
    return local_index
  spec = DATASETS[config.data.dataset]
  if spec.tfds_name is None or (spec.stylegan_tfrecords and config.data.source == "tfrecords"):
    return process_index + process_count * local_index
  per_process, extra = divmod(_num_eval_examples(config), process_count)
  return per_process * process_index + min(process_index, extra) + local_index


def _agree(value: bool) -> bool:
  """Process 0's `value` on every process (chunk files may live on process 0's disk only)."""
  if jax.process_count() == 1:
    return value
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(value)))


def chunk_path(chunk_dir: str, k: int) -> str:
  return os.path.join(chunk_dir, f"chunk_{k:05d}.npz")


def _write_chunk(path: str, out: dict[str, np.ndarray]) -> None:
  """Keeps the real (unpadded) examples of a global batch and writes them as float32 npz."""
  mask = out["mask"].astype(bool)
  arrays = {name: out[name][mask].astype(np.float32) for name in PER_IMAGE_FIELDS}
  buffer = io.BytesIO()
  np.savez(buffer, index=out["index"][mask].astype(np.int64), **arrays)
  file_io.write_atomically(path, buffer.getvalue())


def _chunk_layout(config: ml_collections.ConfigDict, batch: int) -> dict[str, Any]:
  """What determines the contents of chunk k; chunks of another layout are recomputed."""
  data = config.data
  return dict(
    dataset=data.dataset,
    source=data.source,
    data_dir=data.data_dir,
    split=data.eval_split,
    image_size=data.image_size,
    num_examples=config.eval.num_examples,
    batch_per_process=batch,
    process_count=jax.process_count(),
    diffusion=config.diffusion.to_dict(),
    seed=SEED,
    clip_denoised=True,
  )


def _reset_stale_chunks(chunk_dir: str, layout: dict[str, Any]) -> None:
  """Process 0: deletes chunks computed with another layout, then records `layout`."""
  meta_path = os.path.join(chunk_dir, "meta.json")
  if file_io.exists(meta_path):
    if json.loads(file_io.read_text(meta_path)) == layout:
      return
    logging.warning(
      "The chunks in %s were computed with another layout; recomputing them.", chunk_dir
    )
  for path in file_io.glob(chunk_dir, "chunk_*.npz"):
    file_io.remove(path)
  file_io.write_atomically(meta_path, json.dumps(layout, indent=2).encode())


def compute_chunks(
  config: ml_collections.ConfigDict, bundle: ModelBundle, params: Any, chunk_dir: str
) -> int:
  """Computes the chunks missing from `chunk_dir` (call on every process); returns their count."""
  batch = local_batch_size(config.eval.batch_size)
  if jax.process_index() == 0:
    _reset_stale_chunks(chunk_dir, _chunk_layout(config, batch))
  bpd_fn = make_bpd_fn(bundle.diffusion, bundle.model, bundle.mesh, jax.random.PRNGKey(SEED))
  data = pipeline.create_eval_dataset(
    config,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    batch_size_per_process=batch,
    num_examples=config.eval.num_examples,
  )
  num_chunks = 0
  for k, (images, mask) in enumerate(data):
    num_chunks = k + 1
    path = chunk_path(chunk_dir, k)
    if _agree(file_io.exists(path)):
      continue
    start = time.time()
    index = global_example_index(
      config,
      k * batch + np.arange(batch),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    out = bpd_fn(params, images, np.where(mask, index, 0).astype(np.int32), mask)
    if jax.process_index() == 0:
      _write_chunk(path, out)
    real = out["mask"].astype(bool)
    logging.info(
      "bpd chunk %d: mean %.4f bits/dim over %d images (%.1fs)",
      k,
      out["total_bpd"][real].mean() if real.any() else math.nan,
      real.sum(),
      time.time() - start,
    )
  return num_chunks


# ----------------------------------------------------------------------------- the results


def load_chunks(chunk_dir: str, num_chunks: int) -> dict[str, np.ndarray]:
  """Per-image arrays of chunks 0..num_chunks-1, sorted by index: `index` `[N]`, `total_bpd`,
  `prior_bpd` `[N]`, `terms_bpd`, `mse` `[N, T]`."""
  if num_chunks == 0:
    raise ValueError(f"The eval split is empty: no chunk to load in {chunk_dir}.")
  parts = []
  for k in range(num_chunks):
    with np.load(io.BytesIO(file_io.read_bytes(chunk_path(chunk_dir, k)))) as npz:
      parts.append({name: npz[name] for name in ("index", *PER_IMAGE_FIELDS)})
  per_image = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
  order = np.argsort(per_image["index"], kind="stable")
  if np.any(np.diff(per_image["index"][order]) == 0):
    raise ValueError(f"Chunks in {chunk_dir} hold an example twice; delete them and rerun.")
  return {name: value[order] for name, value in per_image.items()}


def summarize(per_image: dict[str, np.ndarray]) -> dict[str, Any]:
  """n, the mean bits/dim and its standard error std / sqrt(n) (population std), the mean prior,
  decoder (L_0) and per-term bits/dim, the mean mse per t and the rate-distortion table."""
  bpd = per_image["total_bpd"].astype(np.float64)
  terms = per_image["terms_bpd"].astype(np.float64)
  curve = rate_distortion.rate_distortion(terms, per_image["mse"], per_image["prior_bpd"])
  return dict(
    n=int(bpd.size),
    mean=float(bpd.mean()),
    stderr=float(bpd.std() / math.sqrt(bpd.size)),
    prior_bpd_mean=float(per_image["prior_bpd"].astype(np.float64).mean()),
    decoder_bpd_mean=float(terms[:, 0].mean()),
    terms_bpd_mean=terms.mean(axis=0).tolist(),
    mse_mean=per_image["mse"].astype(np.float64).mean(axis=0).tolist(),
    rate_distortion=[list(row) for row in curve.table()],
  )


def _per_image_csv(per_image: dict[str, np.ndarray]) -> str:
  lines = ["index,total_bpd,prior_bpd,decoder_bpd"]
  for i, total, prior, decoder in zip(
    per_image["index"],
    per_image["total_bpd"],
    per_image["prior_bpd"],
    per_image["terms_bpd"][:, 0],
    strict=True,
  ):
    lines.append(f"{i},{total:.9g},{prior:.9g},{decoder:.9g}")
  return "\n".join(lines) + "\n"


def write_results(
  workdir: str, step: int, per_image: dict[str, np.ndarray], summary: dict[str, Any]
) -> None:
  """Process 0: bpd.json, bpd_per_image.csv, the rate-distortion CSV and PNG, TensorBoard."""
  out_dir = eval_dir(workdir, step)
  write = file_io.write_atomically
  write(os.path.join(out_dir, "bpd.json"), json.dumps(summary, indent=2).encode())
  write(os.path.join(out_dir, "bpd_per_image.csv"), _per_image_csv(per_image).encode())
  curve = rate_distortion.rate_distortion(
    per_image["terms_bpd"], per_image["mse"], per_image["prior_bpd"]
  )
  rate_distortion.write_csv(
    os.path.join(out_dir, "rate_distortion.csv"), rate_distortion.curve_rows(curve)
  )
  plot = rate_distortion.plot_png(
    os.path.join(out_dir, "rate_distortion.png"), curve.rate, curve.distortion
  )
  writer = metric_writers.create_default_writer(workdir, collection="eval")
  writer.write_scalars(
    step,
    {
      "eval/bpd": summary["mean"],
      "eval/bpd_stderr": summary["stderr"],
      "eval/prior_bpd": summary["prior_bpd_mean"],
      "eval/decoder_bpd": summary["decoder_bpd_mean"],
      "eval/num_examples": summary["n"],
    },
  )
  writer.write_images(step, {"eval/rate_distortion": plot[None]})
  writer.flush()
  writer.close()


def run_bpd_eval(
  config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None
) -> dict[str, Any]:
  """Evaluates the checkpoint of `step` (None or < 0: the latest) in `workdir`; call on every
  process. Rerunning resumes. Returns the summary of bpd.json with `step` and `eval_dir`
  (process 0; the other processes get only `step` and `eval_dir`).

  Raises:
    NoCheckpointError: there is no checkpoint (of `step`) in `workdir`.
  """
  validate_config(config, mode="eval")
  return bpd_of_checkpoint(ModelBundle.from_config(config), workdir, step=step)


def bpd_of_checkpoint(
  bundle: ModelBundle, workdir: str, *, step: int | None = None
) -> dict[str, Any]:
  """`run_bpd_eval` for a validated config's bundle (`--mode=eval` evaluates this way)."""
  config = bundle.config
  workdir = file_io.absolute(workdir)
  pipeline.prepare_embedded_dataset(config)
  params, step = bundle.load_ema_params(workdir, step)
  chunk_dir = os.path.join(eval_dir(workdir, step), "bpd")
  num_chunks = compute_chunks(config, bundle, params, chunk_dir)
  result: dict[str, Any] = dict(step=step, eval_dir=eval_dir(workdir, step))
  if jax.process_index() != 0:
    return result
  per_image = load_chunks(chunk_dir, num_chunks)
  summary = dict(step=step, split=config.data.eval_split, **summarize(per_image))
  write_results(workdir, step, per_image, summary)
  logging.info(
    "Step %d: %.5f +- %.5f bits/dim over %d images of %s; results in %s",
    step,
    summary["mean"],
    summary["stderr"],
    summary["n"],
    summary["split"],
    result["eval_dir"],
  )
  return summary | result
