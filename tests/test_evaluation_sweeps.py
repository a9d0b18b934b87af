"""Sweeps of sampling settings on a tiny class-conditional digits run (T = 20): FID against NFE
and FID and class accuracy against the guidance scale; the rows, the table, the plot, resuming."""

import json
import os

import numpy as np
import pytest
from conftest import tiny_digits_config
from PIL import Image

from ddpm_jax.evaluation import sweeps
from ddpm_jax.sampling import samplers, shards
from ddpm_jax.training import loop as train_loop


def test_nfe_rows_cover_the_references_and_each_sampler_at_each_nfe():
  config = tiny_digits_config(**{"diffusion.num_timesteps": 1000})
  rows = sweeps.nfe_rows(1000, (5, 10, 20))

  def nfe(row):
    settings = sweeps.row_config(config, row).sample
    return samplers.SamplerSpec.from_config(settings, 1000).nfe

  assert [(r.label, nfe(r)) for r in rows[:2]] == [
    ("ancestral, 1000 steps (Algorithm 2)", 1000),
    ("ODE converged: DDIM eta 0, 1000 steps", 1000),
  ]
  by_family = {}
  for row in rows[2:]:
    by_family.setdefault(row.family, []).append(nfe(row))
  assert by_family["DPM-Solver++ (order 3)"] == [5, 10, 20]
  assert by_family["Heun (Karras)"] == [5, 9, 19]  # 2 N - 1 <= the target.
  assert len(by_family) == 6 and all(len(v) == 3 for v in by_family.values())
  # A row's settings replace the config's sampler fields: Karras off unless the row says so.
  karras = next(r for r in rows if r.label == "DPM-Solver++ 3 Karras, 5 steps")
  assert sweeps.row_config(config, karras).sample.karras_sigmas
  plain = next(r for r in rows if r.label == "DPM-Solver++ 3, 5 steps")
  config.sample.karras_sigmas = True
  assert not sweeps.row_config(config, plain).sample.karras_sigmas
  assert [r.sample for r in sweeps.guidance_rows((0, 2))] == [
    {"guidance_scale": 0.0},
    {"guidance_scale": 2.0},
  ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  config = tiny_digits_config(**{
    "data.data_dir": str(root / "tfds"), "training.num_train_steps": 2,
    "training.checkpoint_every_steps": 2, "sample.batch_size": 8, "model.num_classes": 10,
    "sample.sampler": "dpm_solver", "sample.num_steps": 5,
    "eval.fid_stats_dir": str(root / "stats")})  # fmt: skip
  train_loop.train_and_evaluate(config, str(root / "wd"))
  return config, str(root / "wd")


def read_table(out_dir):
  with open(os.path.join(out_dir, "table.md")) as f:
    return f.read().splitlines()


def test_nfe_sweep_writes_the_table_and_the_plot_and_resumes(run, monkeypatch):
  config, workdir = run
  families = ("reference", "DPM-Solver++ (order 3)")
  rows = [r for r in sweeps.nfe_rows(20, (5,)) if r.family in families]
  sweep = dict(name="nfe", num_samples=12, seeds=(1, 2))
  out_dir = sweeps.run_sweep(config, workdir, rows, **sweep)
  assert out_dir == os.path.join(workdir, "nfe_sweep")
  with open(os.path.join(out_dir, "results.json")) as f:
    results = list(json.load(f).values())
  assert len(results) == 3 * 2 and {e["seed"] for e in results} == {1, 2}
  assert all(np.isfinite(e["fid"]) and e["fid"] > 0 and e["seconds"] >= 0 for e in results)
  dpm = [e for e in results if e["label"] == "DPM-Solver++ 3, 5 steps"]
  assert [e["nfe"] for e in dpm] == [5, 5] and dpm[0]["fid"] != dpm[1]["fid"]  # Two seeds.
  assert len(shards.load_samples(dpm[0]["samples"])) == 12
  table = read_table(out_dir)
  assert table[0] == (
    "| sampler | NFE | FID seed 1 | FID seed 2 | FID mean | spread | class accuracy | seconds |"
  )
  assert len(table) == 2 + 3
  cells = next(line for line in table if line.startswith("| DPM-Solver++ 3, 5 steps |"))
  cells = [c.strip() for c in cells.strip("|").split("|")]
  fids = sorted(e["fid"] for e in dpm)
  assert float(cells[4]) == pytest.approx(np.mean(fids), abs=1e-3)
  assert float(cells[5]) == pytest.approx(fids[1] - fids[0], abs=1e-3)
  accuracy = np.mean([e["class_accuracy"] for e in dpm])
  assert cells[6] == f"{100 * accuracy:.1f}%"
  plot = np.asarray(Image.open(os.path.join(out_dir, "plot.png")))
  assert plot.shape == (450, 700, 4) and plot.std() > 0
  # A rerun finds every row done: nothing is sampled again.
  monkeypatch.setattr(shards, "sample_checkpoint", lambda *a: pytest.fail("sampled again"))
  assert sweeps.run_sweep(config, workdir, rows, **sweep) == out_dir


def test_guidance_sweep_scores_fid_and_class_accuracy_per_scale(run):
  config, workdir = run
  out_dir = sweeps.run_sweep(
    config, workdir, sweeps.guidance_rows((0, 3)), name="guidance", num_samples=20, seeds=(1,)
  )
  with open(os.path.join(out_dir, "results.json")) as f:
    results = sorted(json.load(f).values(), key=lambda e: e["guidance_scale"])
  assert [e["guidance_scale"] for e in results] == [0.0, 3.0]
  assert all(0 <= e["class_accuracy"] <= 1 and e["nfe"] == 5 for e in results)
  # Each scale samples into its own directory, whose manifest carries it to the sampler (what
  # the scale does to the samples is tested in test_sampling.py: two train steps barely move the
  # class embedding).
  for e in results:
    with open(os.path.join(e["samples"], shards.MANIFEST_NAME)) as f:
      assert json.load(f)["guidance_scale"] == e["guidance_scale"]
  np.testing.assert_array_equal(shards.load_labels(results[0]["samples"], 20), np.arange(20) % 10)
  table = read_table(out_dir)
  assert table[0].startswith("| sampler | guidance w | FID seed 1 | FID mean |")
  assert [line.split("|")[1].strip() for line in table[2:]] == ["guidance 0", "guidance 3"]
  assert np.asarray(Image.open(os.path.join(out_dir, "plot.png"))).std() > 0
