"""The benchmark harness: our side's figures, the persistent compilation cache, the report."""

import dataclasses
import datetime
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_digits_config

from benchmarks import flops, ours, peer, run
from ddpm_jax import model_bundle
from ddpm_jax.runtime import compilation_cache, xla_flags
from ddpm_jax.sampling import samplers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ours_cli(*args: str) -> dict:
  """`python -m benchmarks.ours ...` on one CPU device -> its JSON result."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.ours", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=True,
  )
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_figure_and_flops(tmp_path):
  config = tiny_digits_config(**{"model.dropout": 0.0})
  result = ours.train_steps_per_s(config, batch=8, steps=2, warmup=1)
  s = result["settings"]
  assert result["unit"] == "steps/s" and result["value"] > 0
  assert s["images_per_s"] == pytest.approx(8 * result["value"])
  # A train step is the forward pass, its backward (~2x) and the optimizer: ~3x the forward.
  # XLA's count is per device (4 here, 2 images each).
  model = model_bundle.create_model(config)
  local = 8 // jax.device_count()
  x, t = jnp.zeros((local, 8, 8, 1)), jnp.zeros((local,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]
  cost = jax.jit(model.apply).lower({"params": params}, x, t).compile().cost_analysis()
  forward = (cost[0] if isinstance(cost, list) else cost)["flops"]
  assert 2.5 * forward < s["flops_per_step"] < 4.5 * forward
  assert s["achieved_gflops"] == pytest.approx(s["flops_per_step"] * result["value"] / 1e9)
  # Model FLOPs (convolutions and dots of the jaxpr): the forward pass, its input gradients and
  # its kernel gradients, ~3x the forward's.
  model_forward = flops.model_flops(model.apply, {"params": params}, x, t)
  assert 2.8 * model_forward < s["model_flops_per_step"] < 3.2 * model_forward
  assert s["model_gflops_per_s"] == pytest.approx(s["model_flops_per_step"] * result["value"] / 1e9)
  assert s["final_loss"] > 0


def test_memory_model_shrinks_with_remat(tmp_path):
  results = {}
  for remat in (False, True):
    config = tiny_digits_config(**{"model.remat": remat})
    results[remat] = ours.memory_model_bytes(config, batch=16)["settings"]
  # The state is params + EMA + two Adam moments; remat only changes the saved activations.
  assert results[True]["train_state_bytes"] == results[False]["train_state_bytes"]
  assert results[True]["train_state_bytes"] == pytest.approx(
    4 * results[True]["gradients_bytes"], rel=0.01
  )
  assert results[True]["saved_activations_bytes"] < 0.5 * results[False]["saved_activations_bytes"]
  parts = ("train_state", "gradients", "saved_activations", "block_working_set")
  for s in results.values():
    assert s["peak_gib"] * 2**30 == pytest.approx(sum(s[f"{p}_bytes"] for p in parts))


def test_compile_is_cached_across_processes(tmp_path):
  """A second process finds the compiled train step in the persistent cache (no new entries)."""
  cache = str(tmp_path / "cache")
  args = (
    "compile",
    "--config=digits",
    "--batch=8",
    f"--cache_dir={cache}",
    "--set=model.num_res_blocks=1",
  )
  cold = _ours_cli(*args)["settings"]
  warm = _ours_cli(*args)["settings"]
  assert cold["cache_entries_before"] == 0 and cold["cache_entries_after"] > 0
  assert warm["cache_entries_before"] == cold["cache_entries_after"]
  assert warm["cache_entries_after"] == warm["cache_entries_before"]
  assert cold["xla_flags"] == xla_flags.with_cpu_flags("")  # As `ddpm_jax.main` runs.


def test_enable_compilation_cache(tmp_path):
  before = jax.config.jax_compilation_cache_dir  # The suite's own (conftest.py).
  assert compilation_cache.enable("") is None
  assert jax.config.jax_compilation_cache_dir == before
  try:
    assert compilation_cache.enable(str(tmp_path / "c")) == str(tmp_path / "c")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_overrides_keep_field_types():
  config = tiny_digits_config()
  ours.apply_overrides(
    config,
    [
      "model.remat=True",
      "model.conv_impl=shifted_matmul",
      "training.batch_size=16",
      "optim.lr=0.5",
    ],
  )
  assert config.model.remat is True and config.model.conv_impl == "shifted_matmul"
  assert config.training.batch_size == 16 and config.optim.lr == 0.5


def _record(name, ours_value, peer_value, unit="steps/s"):
  return dict(
    workload=name,
    description="",
    ours=ours_value,
    peer=peer_value,
    unit=unit,
    ratio=None if peer_value is None else ours_value / peer_value,
    target=None,
    meets_target=None,
    settings=dict(ours={}, peer=None),
  )


def test_workload_record_ratio_and_target(monkeypatch):
  results = {
    "benchmarks.ours": dict(value=6.0, unit="steps/s", settings={"images_per_s": 48.0}),
    "benchmarks.peer": dict(value=4.0, unit="steps/s", settings={"images_per_s": 24.0}),
  }
  monkeypatch.setattr(run, "_run_json", lambda module, args, timeout: (results[module], None))
  w = run.Workload(
    "x", "d", ["train"], ["train"], target=">= 2x peer", meets=run._ratio_at_least(2.0)
  )
  record = run.run_workload(w, quick=False, with_peer=True)
  assert record["ratio"] == pytest.approx(1.5) and record["meets_target"] is False
  assert record["settings"] == {"ours": {"images_per_s": 48.0}, "peer": {"images_per_s": 24.0}}
  assert run.run_workload(w, quick=False, with_peer=False)["peer"] is None

  per_image = run.run_workload(
    dataclasses.replace(w, per_image=True), quick=False, with_peer=True
  )  # Each side's own images/s, from its settings.
  assert per_image["unit"] == "images/s" and (per_image["ours"], per_image["peer"]) == (48.0, 24.0)
  assert per_image["ratio"] == pytest.approx(2.0) and per_image["meets_target"] is True

  monkeypatch.setattr(run, "_run_json", lambda module, args, timeout: (None, "exit 1: boom"))
  failed = run.run_workload(w, quick=True, with_peer=True)
  assert failed["ours"] is None and failed["ratio"] is None and len(failed["errors"]) == 2


def test_suite_quick_subset_and_targets():
  suite = {w.name: w for w in run.workloads("/tmp/cache")}
  assert {
    "digits_train",
    "digits_sample_ancestral",
    "digits_sample_ddim50",
    "cifar10_train",
    "cifar10_forward",
    "cifar10_compile_cold",
    "cifar10_compile_cached",
    "lsun256_memory_b16_remat",
    "matmul_peak_f32",
  } <= {n for n, w in suite.items() if w.in_quick}
  # Quick runs extrapolate the 1000-step chains; the full run samples them.
  assert "--timed_steps=20" in suite["digits_sample_ancestral"].quick_peer
  assert not any(a.startswith("--timed_steps") for a in suite["digits_sample_ancestral"].peer)
  assert suite["lsun256_memory_b16_remat"].meets(_record("m", 15 * 2**30, None, "bytes"))
  assert not suite["lsun256_memory_b16_remat"].meets(_record("m", 17 * 2**30, None, "bytes"))


def test_table_derived_fraction_and_results_path(tmp_path):
  train = _record("cifar10_train", 0.5, 1.0)
  train["settings"]["ours"] = dict(flops_per_step=4e11, achieved_gflops=200.0)
  records = [train, _record("matmul_peak_f32", 400.0, None, "GFLOP/s")]
  derived = run.derived_records(records)
  assert derived[0]["workload"] == "cifar10_train_peak_fraction"
  assert derived[0]["ours"] == pytest.approx(0.5)  # XLA's count where no model FLOPs exist.
  train["settings"]["ours"]["model_gflops_per_s"] = 100.0
  assert run.derived_records(records)[0]["ours"] == pytest.approx(0.25)
  text = run.table(records + derived)
  assert "0.50x" in text and "50.0%" in text and "400 GFLOP/s" in text
  markdown = run.markdown_table(records + derived).splitlines()
  assert len(markdown) == 2 + 3 and markdown[2].startswith("| `cifar10_train` | 0.5 steps/s |")
  path = run.results_path(str(tmp_path), datetime.datetime(2026, 11, 28))
  assert path.startswith(str(tmp_path)) and path.endswith("-2026-11-28.json")
  accelerator = run.results_path(str(tmp_path), datetime.datetime(2026, 11, 28), "accelerator")
  assert accelerator == path.replace("-2026-11-28.json", "-accelerator-2026-11-28.json")


def test_every_suite_entry_parses():
  """Both suites' command lines are valid for `benchmarks.ours` and `benchmarks.peer`."""
  for w in run.workloads("/tmp/cache") + run.accelerator_workloads():
    for args in (w.ours, w.quick_ours):
      if args:
        ours._parser().parse_args(args)
    for args in (w.peer, w.quick_peer):
      if args:
        peer._parser().parse_args(args)


def test_our_side_runs_without_tensorflow():
  """Accelerator hosts may lack TensorFlow, clu and TFDS: the timed train step and sampler must
  not import them."""
  script = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
      raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
from benchmarks import ours, run
tiny = ["--set=model.num_res_blocks=1"]
ours.main(["train", "--batch=4", "--steps=1", "--warmup=1", *tiny])
ours.main(["sample", "--sampler=ddim", "--num_steps=2", "--num_images=4", "--batch=2", *tiny])
ours.main(["sample", "--sampler=dpm_solver", "--num_steps=3", "--num_images=2", *tiny])
"""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  train, sample, dpm = (json.loads(line) for line in proc.stdout.strip().splitlines()[-3:])
  assert train["value"] > 0 and train["settings"]["model_flops_per_step"] > 0
  assert sample["settings"]["num_images_timed"] == 4 and sample["value"] > 0
  s = dpm["settings"]
  assert (s["sampler"], s["num_steps"], s["nfe"], s["order"], s["spacing"]) == (
    "dpm_solver",
    3,
    3,
    2,
    "linspace",
  )
  assert s["lower_order_final"] and s["clip_denoised"] and not s["karras"] and dpm["value"] > 0


class ScriptedRuns:
  """A stand-in for `run._run_json`: each side's scripted values in turn (None: that run fails),
  the modules in the order they ran."""

  def __init__(self, ours_values, peer_values):
    self.values = {"benchmarks.ours": list(ours_values), "benchmarks.peer": list(peer_values)}
    self.calls = []

  def __call__(self, module, args, timeout):
    self.calls.append(module.split(".")[1])
    value = self.values[module].pop(0)
    if value is None:
      return None, f"exit 1: {module}"
    return dict(value=value, unit="images/s", settings=dict(value=value, args=args)), None


def test_pairs_interleave_and_report_medians(monkeypatch):
  scripted = ScriptedRuns([10.0, 12.0, 11.0], [10.0, 8.0, 12.0])
  monkeypatch.setattr(run, "_run_json", scripted)
  w = run.Workload("x", "d", ["ours"], ["peer"], target=">= 1.0x", meets=run._ratio_at_least(1.0))
  partials = []
  record = run.run_workload(w, quick=False, with_peer=True, progress=partials.append)
  assert scripted.calls == ["ours", "peer"] * 3
  # Each side's median; the ratio is the median of the pairs' ratios (1, 1.5, 11/12).
  assert (record["ours"], record["peer"], record["ratio"]) == (11.0, 10.0, 1.0)
  assert record["num_pairs"] == 3 and record["meets_target"] is True
  assert record["ratio_min"] == pytest.approx(11 / 12) and record["ratio_max"] == 1.5
  assert [(p["ours"], p["peer"]) for p in record["pairs"]] == [(10, 10), (12, 8), (11, 12)]
  assert all(p["ours_s"] >= 0 and p["peer_s"] >= 0 for p in record["pairs"])
  assert record["settings"]["ours"]["value"] == 11.0  # The run at the median.
  assert record["settings"]["peer"]["value"] == 10.0
  assert [len(p["pairs"]) for p in partials] == [1, 2, 3] and partials[-1] == record
  json.dumps(record)
  # Quick: 2 pairs, the median of two the mean; --pairs overrides.
  monkeypatch.setattr(run, "_run_json", ScriptedRuns([10.0, 12.0], [10.0, 8.0]))
  quick = run.run_workload(w, quick=True, with_peer=True)
  assert (quick["ours"], quick["peer"], quick["ratio"]) == (11.0, 9.0, 1.25)
  assert quick["num_pairs"] == 2 and quick["settings"]["ours"]["value"] == 10.0
  scripted = ScriptedRuns([1.0] * 4, [1.0] * 4)
  monkeypatch.setattr(run, "_run_json", scripted)
  assert run.run_workload(w, quick=True, with_peer=True, pairs=4)["num_pairs"] == 4
  assert scripted.calls == ["ours", "peer"] * 4


def test_pairs_with_failures_and_unpaired_rows(monkeypatch):
  # The peer fails in the second pair: it is not run again; ours runs on.
  scripted = ScriptedRuns([10.0, 12.0, 14.0], [5.0, None])
  monkeypatch.setattr(run, "_run_json", scripted)
  w = run.Workload("x", "d", ["ours"], ["peer"])
  record = run.run_workload(w, quick=False, with_peer=True)
  assert scripted.calls == ["ours", "peer", "ours", "peer", "ours"]
  assert (record["ours"], record["peer"], record["ratio"]) == (12.0, 5.0, 2.0)
  assert [p["ratio"] for p in record["pairs"]] == [2.0, None, None]
  assert (record["ratio_min"], record["ratio_max"]) == (2.0, 2.0)
  assert record["errors"] == ["exit 1: benchmarks.peer"] and record["wall_s"] >= 0
  # Rows without a peer, or without the peer installed, run our side once, unpaired.
  for unpaired, with_peer in ((run.Workload("y", "d", ["ours"]), True), (w, False)):
    scripted = ScriptedRuns([3.0], [])
    monkeypatch.setattr(run, "_run_json", scripted)
    record = run.run_workload(unpaired, quick=False, with_peer=with_peer)
    assert scripted.calls == ["ours"] and record["ours"] == 3.0 and record["ratio"] is None
    assert "pairs" not in record and "num_pairs" not in record
    assert run.num_pairs(unpaired, quick=False, with_peer=with_peer) == 0


def test_spread_in_tables_and_results_file(monkeypatch, tmp_path, capsys):
  """`main` runs the pairs, keeps each finished pair in the results file, and `--show` prints
  the spread."""
  out = tmp_path / "results.json"
  scripted = ScriptedRuns([50.0, 60.0, 9.0], [40.0, 60.0])

  def runs(module, args, timeout):
    if len(scripted.calls) == 2:  # Pair 1 of the first workload is on disk before pair 2.
      [partial] = json.loads(out.read_text())["records"]
      assert partial["workload"] == "digits_sample_dpm_solver20" and len(partial["pairs"]) == 1
    return scripted(module, args, timeout)

  monkeypatch.setattr(run, "_run_json", runs)
  monkeypatch.setattr(run.peer, "available", lambda: True)
  run.main(["--only=digits_sample_dpm_solver20,cifar10_compile_cold", f"--out={out}", "--pairs=2"])
  assert scripted.calls == ["ours", "peer", "ours", "peer", "ours"]
  records = json.loads(out.read_text())["records"]
  assert [r["workload"] for r in records] == ["digits_sample_dpm_solver20", "cifar10_compile_cold"]
  assert "--sampler=dpm_solver" in records[0]["settings"]["ours"]["args"]
  assert records[0]["ratio"] == pytest.approx(1.125) and records[0]["meets_target"] is True
  assert "pairs" not in records[1]
  text = capsys.readouterr().out
  assert "pair 2/2: ours 60 (" in text and "1.00-1.25x (2 pairs)" in text
  run.main([f"--show={out}"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "| workload | ours | diffusers | ratio | spread | target | met |"
  assert lines[2] == (
    "| `digits_sample_dpm_solver20` | 55 images/s | 50 images/s | 1.12x | 1.00-1.25x (2 pairs) "
    "| >= 1.0x peer | yes |"
  )


def test_dpm_solver_rows():
  suite = {w.name: w for w in run.workloads("/tmp/cache")}
  digits, cifar = suite["digits_sample_dpm_solver20"], suite["cifar10_sample_dpm_solver20"]
  for w in (digits, cifar):
    ours_args, peer_args = ours._parser().parse_args(w.ours), peer._parser().parse_args(w.peer)
    for args in (ours_args, peer_args):
      assert (args.sampler, args.num_steps, args.order, args.spacing) == (
        "dpm_solver",
        20,
        2,
        "linspace",
      )
      assert not args.karras and args.timed_steps is None  # Every step timed.
    assert ours_args.num_images == peer_args.num_images and peer_args.seed_params
    assert w.quick_ours is None and w.quick_peer is None
  assert digits.in_quick and not cifar.in_quick
  assert (digits.ours[1], digits.ours[2]) == ("--config=digits", "--num_images=1000")
  assert cifar.ours[1] == "--config=cifar10" and cifar.ours[2] == "--num_images=8"
  assert digits.meets(_record("d", 1.0, 1.0)) and not digits.meets(_record("d", 0.9, 1.0))
  assert ours.sampler_spec("dpm_solver", 20) == samplers.SamplerSpec("dpm_solver", 20)
