"""Sample quality over a sweep of sampling settings, on a trained run: FID against the number of
network evaluations (NFE) for each sampler, or FID and class accuracy against the guidance scale
of a class-conditional model.

  python -m ddpm_jax.evaluation.sweeps --sweep=nfe --config=configs/digits.py \
      --workdir=workdir_digits
  python -m ddpm_jax.evaluation.sweeps --sweep=guidance \
      --config=configs/digits_conditional.py --workdir=workdir_digits_conditional

For the EMA params of the run's latest checkpoint (or `sample.checkpoint_step`) and each row -
`nfe_rows`: the paper's 1000-step ancestral chain, the converged probability-flow ODE (DDIM with
eta 0 over all T steps), and DDIM, DPM-Solver++, Heun and the strided ancestral sampler at NFE 5,
10, 20, 50, 100; `guidance_rows`: guidance scales 0, 0.5, 1, 2, 4 - it draws `--num_samples`
samples for each of `--seeds` (as `--mode=sample` does, into the run's sample directories, so a
rerun reuses them) and scores them with the dataset's FID features (and, with labels, the
accuracy of their classifier on the requested class). It writes, under
`<workdir>/<sweep>_sweep/`:

  results.json   one entry per (row, seed): settings, NFE, FID, class accuracy, seconds sampling
  table.md       per row: the swept value, FID per seed, their mean and spread, seconds
  plot.png       FID against NFE (log scales; the references as lines), or FID and class
                 accuracy against the guidance scale

Rows already in results.json are not computed again, so an interrupted sweep resumes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from ddpm_jax import file_io
from ddpm_jax.config.validation import validate_config

DEFAULT_NFES = (5, 10, 20, 50, 100)
DEFAULT_GUIDANCE_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0)
# The fields of config.sample a row may set, and their values when it does not.
_ROW_DEFAULTS = {
  "eta": 0.0,
  "order": 2,
  "karras_sigmas": False,
  "spacing": "linspace",
  "lower_order_final": True,
}


@dataclasses.dataclass(frozen=True)
class Row:
  """One setting of a sweep: a label, a family (one line of the plot; 'reference' rows are
  horizontal lines) and the fields of `config.sample` it sets."""

  label: str
  family: str
  sample: dict[str, Any]


def nfe_rows(num_timesteps: int, nfes: Sequence[int] = DEFAULT_NFES) -> list[Row]:
  """The references (Algorithm 2 and the converged ODE, both over all T steps), then each fast
  sampler at each NFE of `nfes` (Heun at the largest odd NFE 2N - 1 <= nfe)."""
  t = num_timesteps
  rows = [
    Row(f"ancestral, {t} steps (Algorithm 2)", "reference",
        {"sampler": "ancestral", "num_steps": t}),
    Row(f"ODE converged: DDIM eta 0, {t} steps", "reference",
        {"sampler": "ddim", "num_steps": t, "eta": 0.0}),
  ]  # fmt: skip
  for nfe in nfes:
    steps, heun = min(nfe, t - 1), max(1, (nfe + 1) // 2)
    rows += [
      Row(f"DDIM eta 0, {steps} steps", "DDIM (eta 0)",
          {"sampler": "ddim", "num_steps": steps, "eta": 0.0}),
      Row(f"DPM-Solver++ 2, {steps} steps", "DPM-Solver++ (order 2)",
          {"sampler": "dpm_solver", "num_steps": steps, "order": 2}),
      Row(f"DPM-Solver++ 3, {steps} steps", "DPM-Solver++ (order 3)",
          {"sampler": "dpm_solver", "num_steps": steps, "order": 3}),
      Row(f"DPM-Solver++ 3 Karras, {steps} steps", "DPM-Solver++ (order 3, Karras)",
          {"sampler": "dpm_solver", "num_steps": steps, "order": 3, "karras_sigmas": True}),
      Row(f"Heun Karras, {heun} steps", "Heun (Karras)",
          {"sampler": "heun", "num_steps": heun, "karras_sigmas": True}),
      Row(f"ancestral strided, {steps} steps", "ancestral, strided (DDIM eta 1)",
          {"sampler": "ancestral", "num_steps": steps}),
    ]  # fmt: skip
  return rows


def guidance_rows(scales: Sequence[float] = DEFAULT_GUIDANCE_SCALES) -> list[Row]:
  """One row per guidance scale w, with the config's sampler (class-balanced labels)."""
  return [Row(f"guidance {w:g}", "guidance", {"guidance_scale": float(w)}) for w in scales]


def row_config(
  config: ml_collections.ConfigDict, row: Row, seed: int = 1, num_samples: int = 1
) -> ml_collections.ConfigDict:
  """`config` sampling as `row` says, `num_samples` samples of `seed`."""
  config = ml_collections.ConfigDict(config.to_dict())
  for name, value in row.sample.items():
    config.sample[name] = value
  if "sampler" in row.sample:  # Solver fields the row leaves out take their defaults.
    for name, value in _ROW_DEFAULTS.items():
      config.sample[name] = row.sample.get(name, value)
  config.sample.seed, config.sample.num_samples = seed, num_samples
  return config


def _key(row: Row, seed: int, num_samples: int) -> str:
  return json.dumps({"sample": row.sample, "seed": seed, "n": num_samples}, sort_keys=True)


def run_sweep(
  config: ml_collections.ConfigDict,
  workdir: str,
  rows: Sequence[Row],
  *,
  name: str,
  num_samples: int = 2000,
  seeds: Sequence[int] = (1, 2),
) -> str:
  """Samples and scores every row for each seed into `<workdir>/<name>_sweep/`; returns it."""
  from ddpm_jax.evaluation import sample_quality  # The feature networks and the real data.
  from ddpm_jax.model_bundle import ModelBundle
  from ddpm_jax.sampling import shards
  from ddpm_jax.sampling.samplers import SamplerSpec

  workdir = file_io.absolute(workdir)
  out_dir = os.path.join(workdir, f"{name}_sweep")
  results_path = os.path.join(out_dir, "results.json")
  results = json.loads(file_io.read_text(results_path)) if file_io.exists(results_path) else {}
  for row in rows:
    for seed in seeds:
      key = _key(row, seed, num_samples)
      if key in results:
        continue
      settings = row_config(config, row, seed, num_samples)
      validate_config(settings, mode="sample")
      start = time.time()
      bundle = ModelBundle.from_config(settings)
      directory = shards.sample_checkpoint(bundle, workdir)
      seconds = time.time() - start
      images = shards.load_samples(directory, num_samples)
      labels = shards.load_labels(directory, num_samples) if config.model.num_classes else None
      quality = sample_quality.evaluate_samples(settings, images, labels)
      spec = SamplerSpec.from_config(settings.sample, bundle.diffusion.num_timesteps)
      results[key] = {
        "label": row.label,
        "family": row.family,
        "nfe": spec.nfe,
        "guidance_scale": settings.sample.guidance_scale,
        "seed": seed,
        "fid": quality["fid"],
        "class_accuracy": quality.get("class_accuracy"),
        "seconds": seconds,
        "samples": directory,
      }
      logging.info("%s, seed %d: FID %.3f (%.0f s)", row.label, seed, quality["fid"], seconds)
      file_io.write_atomically(results_path, json.dumps(results, indent=2).encode())
  entries = [results[_key(row, seed, num_samples)] for row in rows for seed in seeds]
  table = markdown_table(entries, seeds, "guidance_scale" if name == "guidance" else "nfe")
  file_io.write_atomically(os.path.join(out_dir, "table.md"), table.encode())
  plot = plot_guidance if name == "guidance" else plot_fid_vs_nfe
  plot(os.path.join(out_dir, "plot.png"), entries)
  return out_dir


def summarize(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One dict per row (by label, in order): its first entry's fields, fids (per seed), mean,
  spread (max - min), seconds (mean per seed), accuracy (mean; None without labels)."""
  rows: dict[str, dict[str, Any]] = {}
  for e in entries:
    row = rows.setdefault(e["label"], {**e, "fids": [], "seconds": [], "accuracies": []})
    row["fids"].append(e["fid"])
    row["seconds"].append(e["seconds"])
    row["accuracies"].append(e.get("class_accuracy"))
  for row in rows.values():
    row["mean"] = float(np.mean(row["fids"]))
    row["spread"] = float(np.max(row["fids"]) - np.min(row["fids"]))
    row["seconds"] = float(np.mean(row["seconds"]))
    known = [a for a in row["accuracies"] if a is not None]
    row["accuracy"] = float(np.mean(known)) if known else None
  return list(rows.values())


def markdown_table(entries: Sequence[dict[str, Any]], seeds: Sequence[int], swept: str) -> str:
  """The sweep as a Markdown table: the swept value (`nfe` or `guidance_scale`), FID per seed,
  mean, spread, class accuracy (with labels) and seconds per seed."""
  rows = summarize(entries)
  with_accuracy = any(row["accuracy"] is not None for row in rows)
  head = {"nfe": "NFE", "guidance_scale": "guidance w"}[swept]
  columns = [head, *(f"FID seed {s}" for s in seeds), "FID mean", "spread"]
  columns += ["class accuracy"] * with_accuracy + ["seconds"]
  lines = ["| sampler | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
  for row in rows:
    cells = [f"{row[swept]:g}", *(f"{f:.3f}" for f in row["fids"])]
    cells += [f"{row['mean']:.3f}", f"{row['spread']:.3f}"]
    if with_accuracy:
      cells.append("-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%")
    cells.append(f"{row['seconds']:.0f}")
    lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _figure(path: str, draw) -> None:
  """Draws a figure with `draw(fig, ax)` and writes it as a PNG, atomically."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  try:
    draw(fig, ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
  finally:
    plt.close(fig)
  file_io.write_atomically(path, buffer.getvalue())


def plot_fid_vs_nfe(path: str, entries: Sequence[dict[str, Any]]) -> None:
  """FID (mean over seeds, bars: min to max) against NFE, one line per sampler family; the
  references as horizontal lines."""
  rows = summarize(entries)

  def draw(fig, ax):
    for family in dict.fromkeys(r["family"] for r in rows if r["family"] != "reference"):
      points = sorted(
        (r["nfe"], r["mean"], min(r["fids"]), max(r["fids"])) for r in rows if r["family"] == family
      )
      nfe, mean, low, high = (np.asarray(v) for v in zip(*points, strict=True))
      ax.errorbar(nfe, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=family)
    references = [r for r in rows if r["family"] == "reference"]
    for row, style in zip(references, ("--", ":"), strict=False):
      label = f"{row['label']} ({row['nfe']} NFE)"
      ax.axhline(row["mean"], color="black", linestyle=style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per image (NFE)",
           ylabel="FID", title="Sample quality per network call")  # fmt: skip
    ax.legend(fontsize=7)

  _figure(path, draw)


def plot_guidance(path: str, entries: Sequence[dict[str, Any]]) -> None:
  """FID (left axis) and class accuracy (right axis) against the guidance scale w."""
  rows = sorted(summarize(entries), key=lambda r: r["guidance_scale"])

  def draw(fig, ax):
    scales = [r["guidance_scale"] for r in rows]
    ax.plot(scales, [r["mean"] for r in rows], marker="o", color="tab:blue")
    ax.set(xlabel="guidance scale w", ylabel="FID", title="Classifier-free guidance")
    if all(r["accuracy"] is not None for r in rows):
      right = ax.twinx()
      right.plot(scales, [100 * r["accuracy"] for r in rows], marker="s", color="tab:orange")
      right.set(ylabel="class accuracy (%)")

  _figure(path, draw)


def _define_flags() -> None:
  """The flags, defined only when run as a program (importing this module defines none)."""
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_enum("sweep", "nfe", ["nfe", "guidance"], "What to sweep.")
  config_flags.DEFINE_config_file(
    "config", None, "The run's config, e.g. configs/digits.py.", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "The trained run.")
  flags.DEFINE_integer("num_samples", 2000, "Samples per row and seed.")
  flags.DEFINE_list("seeds", ["1", "2"], "Sample seeds (the spread between them is reported).")
  flags.DEFINE_list("nfes", [str(n) for n in DEFAULT_NFES], "--sweep=nfe: the fast samplers' NFE.")
  flags.DEFINE_list(
    "guidance_scales", [f"{w:g}" for w in DEFAULT_GUIDANCE_SCALES], "--sweep=guidance: w."
  )
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  from absl import flags

  from ddpm_jax.runtime import command_line, xla_flags

  xla_flags.apply()  # Before JAX starts its backends.
  command_line.quiet_library_logs()
  f = flags.FLAGS
  if f.sweep == "nfe":
    rows = nfe_rows(f.config.diffusion.num_timesteps, [int(n) for n in f.nfes])
  else:
    rows = guidance_rows([float(w) for w in f.guidance_scales])
  seeds = [int(s) for s in f.seeds]
  try:
    out_dir = run_sweep(
      f.config, f.workdir, rows, name=f.sweep, num_samples=f.num_samples, seeds=seeds
    )
  except (FileNotFoundError, ValueError) as e:  # No checkpoint, a config error: one line.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(file_io.read_text(os.path.join(out_dir, "table.md")))
  print(f"Wrote {out_dir}/table.md and plot.png", flush=True)


if __name__ == "__main__":
  from absl import app

  from ddpm_jax.runtime import command_line

  _define_flags()
  app.run(main, flags_parser=command_line.parse_flags)
