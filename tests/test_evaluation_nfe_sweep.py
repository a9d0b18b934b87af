"""FID against NFE for each sampler, on a tiny digits run (T = 20): the rows, the table, the plot,
and resuming."""

import json
import os

import numpy as np
import pytest
from conftest import tiny_digits_config
from PIL import Image

from ddpm_jax.evaluation import nfe_sweep
from ddpm_jax.sampling import shards
from ddpm_jax.training import loop as train_loop


def test_rows_cover_the_references_and_each_sampler_at_each_nfe():
  rows = nfe_sweep.sweep_rows(1000, (5, 10, 20))
  assert [(r.label, r.nfe()) for r in rows[:2]] == [
    ("ancestral, 1000 steps (Algorithm 2)", 1000),
    ("ODE converged: DDIM eta 0, 1000 steps", 1000),
  ]
  by_family = {}
  for row in rows[2:]:
    by_family.setdefault(row.family, []).append(row.nfe())
  assert by_family["DPM-Solver++ (order 3)"] == [5, 10, 20]
  assert by_family["Heun (Karras)"] == [5, 9, 19]  # 2 N - 1 <= the target.
  assert len(by_family) == 6 and all(len(v) == 3 for v in by_family.values())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  config = tiny_digits_config(
    **{
      "data.data_dir": str(root / "tfds"),
      "training.num_train_steps": 2,
      "training.checkpoint_every_steps": 2,
      "sample.batch_size": 8,
      "eval.fid_stats_dir": str(root / "stats"),
    }
  )
  train_loop.train_and_evaluate(config, str(root / "wd"))
  return config, str(root / "wd")


def test_sweep_writes_the_table_and_the_plot_and_resumes(run, monkeypatch):
  config, workdir = run
  families = ("reference", "DPM-Solver++ (order 3)", "Heun (Karras)")
  rows = [r for r in nfe_sweep.sweep_rows(20, (5,)) if r.family in families]
  sweep = dict(num_samples=12, seeds=(1, 2), rows=rows)
  out_dir = nfe_sweep.run_sweep(config, workdir, **sweep)
  with open(os.path.join(out_dir, "results.json")) as f:
    results = list(json.load(f).values())
  assert len(results) == 4 * 2 and {e["seed"] for e in results} == {1, 2}
  assert all(np.isfinite(e["fid"]) and e["fid"] > 0 and e["seconds"] >= 0 for e in results)
  dpm = [e for e in results if e["label"] == "DPM-Solver++ 3, 5 steps"]
  assert [e["nfe"] for e in dpm] == [5, 5] and dpm[0]["fid"] != dpm[1]["fid"]  # Two seeds.
  assert len(shards.load_samples(dpm[0]["samples"])) == 12
  with open(os.path.join(out_dir, "table.md")) as f:
    table = f.read().splitlines()
  assert table[0] == "| sampler | NFE | FID seed 1 | FID seed 2 | FID mean | spread | seconds |"
  assert len(table) == 2 + 4
  row = next(line for line in table if line.startswith("| DPM-Solver++ 3, 5 steps |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  fids = sorted(e["fid"] for e in dpm)
  assert float(cells[4]) == pytest.approx(np.mean(fids), abs=1e-3)
  assert float(cells[5]) == pytest.approx(fids[1] - fids[0], abs=1e-3)
  plot = np.asarray(Image.open(os.path.join(out_dir, "fid_vs_nfe.png")))
  assert plot.shape == (450, 700, 4) and plot.std() > 0
  # A rerun finds every row done: nothing is sampled again.
  monkeypatch.setattr(shards, "sample_checkpoint", lambda *a: pytest.fail("sampled again"))
  assert nfe_sweep.run_sweep(config, workdir, **sweep) == out_dir
