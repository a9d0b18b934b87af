"""Sample quality per network call: FID against NFE for each sampler, on a trained run.

  python -m ddpm_jax.evaluation.nfe_sweep --config=configs/digits.py --workdir=workdir_digits

For the EMA params of the run's latest checkpoint (or `sample.checkpoint_step`) and each sampler
of `sweep_rows` - the paper's 1000-step ancestral chain, the converged probability-flow ODE (DDIM
with eta 0 over all T steps), and DDIM, DPM-Solver++, Heun and the strided ancestral sampler at
NFE 5, 10, 20, 50, 100 - it draws `--num_samples` samples for each of `--seeds` (as
`--mode=sample` does, into the run's sample directories, so a rerun reuses them) and scores them
with the dataset's FID features. It writes, under `<workdir>/nfe_sweep/`:

  results.json     one entry per (row, seed): sampler settings, NFE, FID, seconds to sample
  table.md         per row: NFE, FID per seed, their mean and spread, seconds
  fid_vs_nfe.png   FID against NFE (log scale), one line per sampler, the references as lines

Rows already in results.json are not computed again, so an interrupted sweep resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from ddpm_jax import file_io, solvers
from ddpm_jax.config.validation import validate_config

DEFAULT_NFES = (5, 10, 20, 50, 100)


@dataclasses.dataclass(frozen=True)
class Row:
  """One sampler setting of the sweep: a label, a family (one line of the plot), overrides of
  `config.sample`."""

  label: str
  family: str
  sample: dict[str, Any]

  def nfe(self) -> int:
    return solvers.num_function_evals(self.sample["sampler"], self.sample["num_steps"])


def sweep_rows(num_timesteps: int, nfes: Sequence[int] = DEFAULT_NFES) -> list[Row]:
  """The references (Algorithm 2 and the converged ODE, both over all T steps), then each fast
  sampler at each NFE of `nfes` (Heun at the largest odd NFE 2N - 1 <= nfe)."""
  t = num_timesteps
  rows = [
    Row(
      f"ancestral, {t} steps (Algorithm 2)", "reference", {"sampler": "ancestral", "num_steps": t}
    ),
    Row(
      f"ODE converged: DDIM eta 0, {t} steps",
      "reference",
      {"sampler": "ddim", "num_steps": t, "eta": 0.0},
    ),
  ]
  for nfe in nfes:
    steps = min(nfe, t - 1)
    rows += [
      Row(
        f"DDIM eta 0, {steps} steps",
        "DDIM (eta 0)",
        {"sampler": "ddim", "num_steps": steps, "eta": 0.0},
      ),
      Row(
        f"DPM-Solver++ 2, {steps} steps",
        "DPM-Solver++ (order 2)",
        {"sampler": "dpm_solver", "num_steps": steps, "order": 2},
      ),
      Row(
        f"DPM-Solver++ 3, {steps} steps",
        "DPM-Solver++ (order 3)",
        {"sampler": "dpm_solver", "num_steps": steps, "order": 3},
      ),
      Row(
        f"DPM-Solver++ 3 Karras, {steps} steps",
        "DPM-Solver++ (order 3, Karras)",
        {"sampler": "dpm_solver", "num_steps": steps, "order": 3, "karras_sigmas": True},
      ),
      Row(
        f"Heun Karras, {max(1, (nfe + 1) // 2)} steps",
        "Heun (Karras)",
        {"sampler": "heun", "num_steps": max(1, (nfe + 1) // 2), "karras_sigmas": True},
      ),
      Row(
        f"ancestral strided, {steps} steps",
        "ancestral, strided (DDIM eta 1)",
        {"sampler": "ancestral", "num_steps": steps},
      ),
    ]
  return rows


def _row_config(
  config: ml_collections.ConfigDict, row: Row, seed: int, num_samples: int
) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  defaults = {
    "eta": 0.0,
    "order": 2,
    "karras_sigmas": False,
    "spacing": "linspace",
    "lower_order_final": True,
  }
  for name, value in {**defaults, **row.sample}.items():
    config.sample[name] = value
  config.sample.seed, config.sample.num_samples = seed, num_samples
  return config


def _key(row: Row, seed: int, num_samples: int) -> str:
  return json.dumps({"sample": row.sample, "seed": seed, "n": num_samples}, sort_keys=True)


def run_sweep(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  num_samples: int = 2000,
  seeds: Sequence[int] = (1, 2),
  nfes: Sequence[int] = DEFAULT_NFES,
  rows: Sequence[Row] | None = None,
) -> str:
  """Samples and scores every row (default `sweep_rows` at `nfes`) for each seed; returns the
  output directory."""
  from ddpm_jax.evaluation import sample_quality  # The feature networks and the real data.
  from ddpm_jax.model_bundle import ModelBundle
  from ddpm_jax.sampling import shards

  workdir = file_io.absolute(workdir)
  out_dir = os.path.join(workdir, "nfe_sweep")
  results_path = os.path.join(out_dir, "results.json")
  results = json.loads(file_io.read_text(results_path)) if file_io.exists(results_path) else {}
  rows = rows or sweep_rows(config.diffusion.num_timesteps, nfes)
  for row in rows:
    for seed in seeds:
      key = _key(row, seed, num_samples)
      if key in results:
        continue
      row_config = _row_config(config, row, seed, num_samples)
      validate_config(row_config, mode="sample")
      start = time.time()
      directory = shards.sample_checkpoint(ModelBundle.from_config(row_config), workdir)
      seconds = time.time() - start
      quality = sample_quality.evaluate_samples(
        row_config, shards.load_samples(directory, num_samples)
      )
      results[key] = {
        "label": row.label,
        "family": row.family,
        "nfe": row.nfe(),
        "seed": seed,
        "fid": quality["fid"],
        "seconds": seconds,
        "samples": directory,
      }
      logging.info("%s, seed %d: FID %.3f (%.0f s)", row.label, seed, quality["fid"], seconds)
      file_io.write_atomically(results_path, json.dumps(results, indent=2).encode())
  entries = [results[_key(row, seed, num_samples)] for row in rows for seed in seeds]
  file_io.write_atomically(
    os.path.join(out_dir, "table.md"), markdown_table(entries, seeds).encode()
  )
  plot_fid_vs_nfe(os.path.join(out_dir, "fid_vs_nfe.png"), entries)
  return out_dir


def summarize(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One dict per row (by label, in order): nfe, fids (per seed), mean, spread (max - min),
  seconds (mean per seed), family."""
  rows: dict[str, dict[str, Any]] = {}
  for e in entries:
    row = rows.setdefault(
      e["label"],
      {"label": e["label"], "family": e["family"], "nfe": e["nfe"], "fids": [], "seconds": []},
    )
    row["fids"].append(e["fid"])
    row["seconds"].append(e["seconds"])
  for row in rows.values():
    row["mean"] = float(np.mean(row["fids"]))
    row["spread"] = float(np.max(row["fids"]) - np.min(row["fids"]))
    row["seconds"] = float(np.mean(row["seconds"]))
  return list(rows.values())


def markdown_table(entries: Sequence[dict[str, Any]], seeds: Sequence[int]) -> str:
  """The sweep as a Markdown table: NFE, FID per seed, mean, spread, seconds per seed."""
  seed_columns = " | ".join(f"FID seed {s}" for s in seeds)
  lines = [
    f"| sampler | NFE | {seed_columns} | FID mean | spread | seconds |",
    "|---|---|" + "---|" * len(seeds) + "---|---|---|",
  ]
  for row in summarize(entries):
    fids = " | ".join(f"{f:.3f}" for f in row["fids"])
    lines.append(
      f"| {row['label']} | {row['nfe']} | {fids} | {row['mean']:.3f} | "
      f"{row['spread']:.3f} | {row['seconds']:.0f} |"
    )
  return "\n".join(lines) + "\n"


def plot_fid_vs_nfe(path: str, entries: Sequence[dict[str, Any]]) -> None:
  """FID (mean over seeds, bars: min to max) against NFE, one line per sampler family; the
  references as horizontal lines. Written atomically as a PNG."""
  import io

  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  rows = summarize(entries)
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  try:
    for family in dict.fromkeys(r["family"] for r in rows if r["family"] != "reference"):
      points = sorted(
        (r["nfe"], r["mean"], min(r["fids"]), max(r["fids"])) for r in rows if r["family"] == family
      )
      nfe, mean, low, high = (np.asarray(v) for v in zip(*points, strict=True))
      ax.errorbar(nfe, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=family)
    for row, style in zip(
      [r for r in rows if r["family"] == "reference"], ("--", ":"), strict=False
    ):
      ax.axhline(
        row["mean"], color="black", linestyle=style, label=f"{row['label']} ({row['nfe']} NFE)"
      )
    ax.set(
      xscale="log",
      yscale="log",
      xlabel="network evaluations per image (NFE)",
      ylabel="FID",
      title="Sample quality per network call",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
  finally:
    plt.close(fig)
  file_io.write_atomically(path, buffer.getvalue())


def _define_flags() -> None:
  """The flags, defined only when run as a program (importing this module defines none)."""
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config", None, "The run's config, e.g. configs/digits.py.", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "The trained run.")
  flags.DEFINE_integer("num_samples", 2000, "Samples per sampler and seed.")
  flags.DEFINE_list("seeds", ["1", "2"], "Sample seeds (the spread between them is reported).")
  flags.DEFINE_list("nfes", [str(n) for n in DEFAULT_NFES], "NFE of the fast samplers.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  from absl import flags

  from ddpm_jax.runtime import command_line, xla_flags

  xla_flags.apply()  # Before JAX starts its backends.
  command_line.quiet_library_logs()
  f = flags.FLAGS
  try:
    out_dir = run_sweep(
      f.config,
      f.workdir,
      num_samples=f.num_samples,
      seeds=[int(s) for s in f.seeds],
      nfes=[int(n) for n in f.nfes],
    )
  except (FileNotFoundError, ValueError) as e:  # No checkpoint, a config error: one line.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(file_io.read_text(os.path.join(out_dir, "table.md")))
  print(f"Wrote {out_dir}/table.md and fid_vs_nfe.png", flush=True)


if __name__ == "__main__":
  from absl import app

  from ddpm_jax.runtime import command_line

  _define_flags()
  app.run(main, flags_parser=command_line.parse_flags)
