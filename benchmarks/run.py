"""Runs every benchmark, ours and the PyTorch peer's, on this machine; prints a table and writes
`benchmarks/results/<host>-<date>.json`.

  python -m benchmarks.run          # Full run; the peer's 1000 x 1000 sampling alone takes minutes.
  python -m benchmarks.run --quick  # The subset with targets: shorter timings, 2 pairs per peer.
  python -m benchmarks.run --only=digits_train,cifar10_train
  python -m benchmarks.run --accelerator   # GPU/TPU: bfloat16 steps at full batch, 50k samples
                                           # (writes <host>-accelerator-<date>.json).
  python -m benchmarks.run --show=benchmarks/results/<host>-<date>.json   # as a Markdown table

Installs nothing. The peer (HF diffusers UNet2DModel with its DDPM, DDIM and DPM-Solver++
schedulers on PyTorch) comes from the optional extra, `pip install -e ".[bench]"`; without it the
peer's column is empty. Each figure runs in a fresh process (`benchmarks.ours` /
`benchmarks.peer`), one after the other, so they never share the cores. A record is {workload,
ours, peer, unit, ratio, target, meets_target, settings, wall_s}; ratio is ours / peer for
throughputs (higher is better).

The two sides of a workload with a peer run as K interleaved pairs of processes (ours, peer, ours,
peer, ...; K = 3, --quick 2, --pairs=K), so that a drift of this machine's speed hits both: the
record's ours and peer are each side's median and its ratio the median of the pairs' ratios, and
it keeps the pairs (pairs, num_pairs) and the ratios' spread (ratio_min, ratio_max).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks import peer

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GIB = 2**30
PAIRS, QUICK_PAIRS = 3, 2  # Interleaved (ours, peer) pairs of processes per workload with a peer.
CIFAR_SAMPLE_BATCH = 8


@dataclasses.dataclass(frozen=True)
class Workload:
  """One row: how to run our side and the peer's (None: no peer figure), full and quick."""

  name: str
  description: str
  ours: list[str]
  peer: list[str] | None = None
  quick_ours: list[str] | None = None  # None: same as full.
  quick_peer: list[str] | None = None
  in_quick: bool = True
  target: str = ""
  meets: Callable[[dict[str, Any]], bool] | None = None  # Record -> target met.
  timeout_s: int = 3600
  per_image: bool = False  # Train steps reported as images/s (each side's settings.images_per_s).


def _ratio_at_least(minimum: float) -> Callable[[dict[str, Any]], bool]:
  return lambda r: r["ratio"] is not None and r["ratio"] >= minimum


def _ours_below(limit: float) -> Callable[[dict[str, Any]], bool]:
  return lambda r: r["ours"] is not None and r["ours"] < limit


def workloads(cache_dir: str) -> list[Workload]:
  """The benchmark suite; `cache_dir` is a fresh directory for the compile-time pair."""
  digits_sample = ["sample", "--config=digits", "--num_images=1000"]
  cifar_sample = ["sample", "--config=cifar10", f"--num_images={CIFAR_SAMPLE_BATCH}"]
  dpm_solver20 = ["--sampler=dpm_solver", "--num_steps=20", "--order=2"]
  cifar_train = ["train", "--config=cifar10", "--batch=16"]
  lsun = ["--config=lsun_church"]
  return [
    Workload(
      "digits_train",
      "digits U-Net (1.0M) train step, batch 128",
      ["train", "--config=digits", "--batch=128", "--steps=30", "--warmup=3"],
      ["train", "--config=digits", "--batch=128", "--steps=30", "--warmup=3"],
      ["train", "--config=digits", "--batch=128", "--steps=10", "--warmup=2"],
      ["train", "--config=digits", "--batch=128", "--steps=10", "--warmup=2"],
      target=">= 2x peer",
      meets=_ratio_at_least(2.0),
    ),
    Workload(
      "digits_train_xla_default_flags",
      "digits train step with XLA's default CPU flags (ours only)",
      [
        "train",
        "--config=digits",
        "--batch=128",
        "--steps=30",
        "--warmup=3",
        "--xla_default_flags",
      ],
      in_quick=False,
    ),
    Workload(
      "digits_sample_ancestral",
      "digits, 1000 images x 1000 ancestral steps, one batch",
      [*digits_sample, "--sampler=ancestral"],
      [*digits_sample, "--sampler=ancestral", "--seed_params"],
      [*digits_sample, "--sampler=ancestral", "--timed_steps=20"],
      [*digits_sample, "--sampler=ancestral", "--timed_steps=20"],
      target=">= 5x peer",
      meets=_ratio_at_least(5.0),
    ),
    Workload(
      "digits_sample_ddim50",
      "digits, 1000 images x 50 DDIM steps (eta 0), one batch",
      [*digits_sample, "--sampler=ddim", "--num_steps=50"],
      [*digits_sample, "--sampler=ddim", "--num_steps=50", "--seed_params"],
      target=">= 5x peer",
      meets=_ratio_at_least(5.0),
    ),
    Workload(
      "digits_sample_dpm_solver20",
      "digits, 1000 images x 20 DPM-Solver++ steps (order 2, linspace, lower-order final "
      "steps, clipped x_0), one batch",
      [*digits_sample, *dpm_solver20],
      [*digits_sample, *dpm_solver20, "--seed_params"],
      target=">= 1.0x peer",
      meets=_ratio_at_least(1.0),
    ),
    Workload(
      "cifar10_sample_dpm_solver20",
      f"CIFAR-10, {CIFAR_SAMPLE_BATCH} images x 20 DPM-Solver++ steps (as above), one batch, "
      "every step timed",
      [*cifar_sample, *dpm_solver20],
      [*cifar_sample, *dpm_solver20, "--seed_params"],
      in_quick=False,  # --quick has the network's speed in cifar10_forward.
      target=">= 1.0x peer",
      meets=_ratio_at_least(1.0),
    ),
    Workload(
      "cifar10_train",
      "CIFAR-10 U-Net (35.7M) train step, fp32, batch 16",
      [*cifar_train, "--steps=8"],
      [*cifar_train, "--steps=8"],
      [*cifar_train, "--steps=3", "--warmup=1"],
      [*cifar_train, "--steps=3", "--warmup=1"],
      target=">= 1.0x peer",
      meets=_ratio_at_least(1.0),
      per_image=True,
    ),
    *[
      Workload(
        f"cifar10_train_conv_{impl}",
        f"the same with conv_impl={impl}",
        [*cifar_train, "--steps=8", f"--set=model.conv_impl={impl}"],
        [*cifar_train, "--steps=8"],
        in_quick=False,
        per_image=True,
      )
      for impl in ("xla_matmul_grad", "shifted_matmul")
    ],
    Workload(
      "cifar10_train_xla_default_flags",
      "the same with XLA's default CPU flags (YNNPACK convolutions; ours only)",
      [*cifar_train, "--steps=8", "--xla_default_flags"],
      in_quick=False,
      per_image=True,
    ),
    Workload(
      "cifar10_forward",
      "CIFAR-10 U-Net forward, eval mode, batch 64",
      ["forward", "--config=cifar10", "--batch=64", "--steps=5"],
      ["forward", "--config=cifar10", "--batch=64", "--steps=5"],
      ["forward", "--config=cifar10", "--batch=64", "--steps=2", "--warmup=1"],
      ["forward", "--config=cifar10", "--batch=64", "--steps=2", "--warmup=1"],
    ),
    Workload(
      "cifar10_compile_cold",
      "lower + compile of the CIFAR-10 train step, empty "
      "persistent cache (seconds, lower is better)",
      ["compile", "--config=cifar10", "--batch=16", f"--cache_dir={cache_dir}"],
      target="< 60 s",
      meets=_ours_below(60.0),
    ),
    Workload(
      "cifar10_compile_cached",
      "the same in a new process, cache from the run above",
      ["compile", "--config=cifar10", "--batch=16", f"--cache_dir={cache_dir}"],
      target="< 10 s",
      meets=_ours_below(10.0),
    ),
    *[
      Workload(
        f"lsun256_memory_b{b}_{'remat' if remat else 'noremat'}",
        f"256x256 U-Net (113.7M) train step, peak memory per device at batch {b}, "
        f"model.remat={remat}: state + gradients + saved activations + largest block's "
        "compiled working set (bytes)",
        ["memory_model", *lsun, f"--batch={b}", f"--set=model.remat={remat}"],
        in_quick=(b, remat) == (16, True),  # The row with a target; memory does not drift.
        target="< 16 GiB" if (b, remat) == (16, True) else "",
        meets=_ours_below(16 * GIB) if (b, remat) == (16, True) else None,
      )
      for b in (8, 16)
      for remat in (False, True)
    ],
    *[
      Workload(
        f"lsun256_xla_memory_b16_{'remat' if remat else 'noremat'}",
        f"the same at batch 16, model.remat={remat}, from XLA's compiled memory analysis of "
        "the whole step on this backend (XLA:CPU does not realise remat's savings)",
        ["memory", *lsun, "--batch=16", f"--set=model.remat={remat}"],
        in_quick=False,
      )
      for remat in (False, True)
    ],
    Workload(
      "matmul_peak_f32",
      "this machine's float32 matmul peak, [4096,2048]x[2048,2048]",
      ["matmul_peak", "--dtype=float32"],
    ),
  ]


def accelerator_workloads() -> list[Workload]:
  """The GPU/TPU suite (`--accelerator`): bfloat16 steps at full batch and 50,000 samples.
  Our side only; the chip's peak is measured as a bfloat16 matmul."""
  bf16 = "--set=model.dtype=bfloat16"
  sample = ["sample", "--config=cifar10", "--num_images=50000", "--batch=2500", bf16]
  return [
    Workload(
      "matmul_peak_bf16",
      "bfloat16 matmul peak, [16384,8192]x[8192,8192]",
      ["matmul_peak", "--dtype=bfloat16", "--matmul_size=8192"],
    ),
    Workload(
      "cifar10_train_b128_bf16",
      "CIFAR-10 train step, bfloat16, batch 128",
      ["train", "--config=cifar10", "--batch=128", "--steps=50", "--warmup=5", bf16],
      per_image=True,
    ),
    Workload(
      "lsun256_train_b64_bf16",
      "256x256 train step, bfloat16, batch 64, remat",
      [
        "train",
        "--config=lsun_church",
        "--batch=64",
        "--steps=10",
        "--warmup=2",
        bf16,
        "--set=model.remat=True",
      ],
      per_image=True,
    ),
    Workload(
      "cifar10_sample_50k_ddim100",
      "50,000 CIFAR-10 samples, DDIM 100 steps, bf16",
      [*sample, "--sampler=ddim", "--num_steps=100"],
    ),
    Workload(
      "cifar10_sample_50k_ancestral",
      "50,000 CIFAR-10 samples, 1000 ancestral steps, bf16 (one batch's 50 steps, extrapolated)",
      [*sample, "--sampler=ancestral", "--timed_steps=50"],
    ),
  ]


def _run_json(module: str, args: list[str], timeout_s: int) -> tuple[dict | None, str | None]:
  """Runs `python -m module args`; (its JSON result, None) or (None, the error)."""
  cmd = [sys.executable, "-m", module, *args]
  try:
    proc = subprocess.run(
      cmd,
      capture_output=True,
      text=True,
      timeout=timeout_s,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
  except subprocess.TimeoutExpired:
    return None, f"timed out after {timeout_s} s: {' '.join(cmd)}"
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    return None, f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}"
  return json.loads(lines[-1]), None


def num_pairs(w: Workload, quick: bool, with_peer: bool, pairs: int | None = None) -> int:
  """How many (ours, peer) pairs of processes a workload runs: `pairs` (default PAIRS, quick
  QUICK_PAIRS) with a peer, else 0 (our side runs once)."""
  if w.peer is None or not with_peer:
    return 0
  return pairs or (QUICK_PAIRS if quick else PAIRS)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """The run whose value is nearest the median of all (the first of equals)."""
  middle = statistics.median(r["value"] for r in runs)
  return min(runs, key=lambda r: abs(r["value"] - middle))


def _record(
  w: Workload,
  runs: dict[str, list[dict]],
  pairs: list[dict],
  k: int,
  errors: list[str],
  wall_s: float,
) -> dict[str, Any]:
  """The record of a workload from each side's runs (results with "value" and "settings") and,
  when paired, the pairs so far: each side's median, ratio the median of the pairs' ratios;
  wall_s: the seconds its processes took, start to end."""
  sides = {side: _median_run(r) if r else None for side, r in runs.items()}
  unit = next((r["unit"] for r in runs["ours"] + runs["peer"]), None)
  record = dict(
    workload=w.name,
    description=w.description,
    ours=statistics.median(r["value"] for r in runs["ours"]) if runs["ours"] else None,
    peer=statistics.median(r["value"] for r in runs["peer"]) if runs["peer"] else None,
    unit=unit,
    ratio=None,
    target=w.target or None,
    meets_target=None,
    settings={side: r["settings"] if r else None for side, r in sides.items()},
    wall_s=round(wall_s, 1),
  )
  ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
  if k:
    record.update(
      num_pairs=k,
      pairs=list(pairs),
      ratio_min=min(ratios) if ratios else None,
      ratio_max=max(ratios) if ratios else None,
    )
    record["ratio"] = statistics.median(ratios) if ratios else None
  elif record["ours"] is not None and record["peer"]:
    record["ratio"] = record["ours"] / record["peer"]
  if w.meets is not None and record["ours"] is not None:
    record["meets_target"] = bool(w.meets(record))
  if errors:
    record["errors"] = list(errors)
  return record


def run_workload(
  w: Workload,
  quick: bool,
  with_peer: bool,
  timeout_s: int | None = None,
  pairs: int | None = None,
  progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
  """Both sides of one workload -> its record; `timeout_s` (per process) overrides the workload's.

  With a peer, the sides run as `num_pairs` interleaved pairs of fresh processes: ours, peer,
  ours, peer, ... The record's ours and peer are each side's median, its ratio the median of the
  pairs' ratios, and it keeps every pair (values, ratio, wall seconds), the ratios' min and max
  and the number of pairs; the settings are those of each side's run nearest its median. A side
  that fails is not run again. `progress(record so far)` is called after each pair.
  """
  timeout_s = timeout_s or w.timeout_s
  k = num_pairs(w, quick, with_peer, pairs)
  commands = [("ours", "benchmarks.ours", (w.quick_ours or w.ours) if quick else w.ours)]
  if k:
    commands.append(("peer", "benchmarks.peer", (w.quick_peer or w.peer) if quick else w.peer))
  runs: dict[str, list[dict]] = {"ours": [], "peer": []}
  pair_records: list[dict] = []
  errors: list[str] = []
  failed: set[str] = set()
  wall_s = 0.0
  for _ in range(max(k, 1)):
    pair: dict[str, Any] = dict(ours=None, peer=None, ratio=None)
    for side, module, args in commands:
      if side in failed:
        continue
      result, error, seconds = _run_side(w, module, args, timeout_s)
      pair[f"{side}_s"], wall_s = seconds, wall_s + seconds
      if error:
        failed.add(side)
        errors.append(error)
      else:
        runs[side].append(result)
        pair[side] = result["value"]
    if k:
      if pair["ours"] is not None and pair["peer"]:
        pair["ratio"] = pair["ours"] / pair["peer"]
      pair_records.append(pair)
      if progress is not None:
        progress(_record(w, runs, pair_records, k, errors, wall_s))
  return _record(w, runs, pair_records, k, errors, wall_s)


def _run_side(
  w: Workload, module: str, args: list[str], timeout_s: int
) -> tuple[dict | None, str | None, float]:
  """(result in the row's unit or None, error or None, wall seconds) of one side's process."""
  start = time.perf_counter()
  result, error = _run_json(module, args, timeout_s)
  seconds = round(time.perf_counter() - start, 1)
  if result is not None and w.per_image:
    result = dict(result, value=result["settings"]["images_per_s"], unit="images/s")
  return result, error, seconds


# (train workload, matmul peak workload, target fraction or None)
_PEAK_FRACTIONS = (
  ("cifar10_train", "matmul_peak_f32", None),
  ("cifar10_train_b128_bf16", "matmul_peak_bf16", 0.4),
  ("lsun256_train_b64_bf16", "matmul_peak_bf16", 0.4),
)


def derived_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each train step's model FLOP rate as a fraction of the measured matmul peak of its
  precision (model FLOP utilisation against what this machine's matmul reaches)."""
  by_name = {r["workload"]: r for r in records}
  derived = []
  for train_name, peak_name, target in _PEAK_FRACTIONS:
    train, peak = by_name.get(train_name), by_name.get(peak_name)
    if not (train and peak and train["ours"] and peak["ours"]):
      continue
    s = train["settings"]["ours"]
    rate = s.get("model_gflops_per_s", s["achieved_gflops"])  # Older records: XLA's count.
    fraction = rate / peak["ours"]
    derived.append(
      dict(
        workload=f"{train_name}_peak_fraction",
        description=f"{train_name}: model FLOPs/s (benchmarks.flops: the step's convolutions "
        f"and dots, without remat) over the measured {peak_name}",
        ours=fraction,
        peer=None,
        unit="fraction",
        ratio=None,
        target=None if target is None else f">= {target:.0%}",
        meets_target=None if target is None else fraction >= target,
        settings=dict(
          ours=dict(
            model_flops_per_step=s.get("model_flops_per_step"),
            model_gflops_per_s=rate,
            flops_per_step=s["flops_per_step"],
            achieved_gflops=s["achieved_gflops"],
            matmul_peak_gflops=peak["ours"],
          ),
          peer=None,
        ),
      )
    )
  return derived


def _format(value: float | None, unit: str | None) -> str:
  if value is None:
    return "-"
  if unit == "bytes":
    return f"{value / GIB:.2f} GiB"
  if unit == "fraction":
    return f"{value:.1%}"
  return f"{value:.4g} {unit}"


def _spread(r: dict[str, Any]) -> str:
  """'min-max x (K pairs)' of a paired record's ratios; '' for others."""
  if r.get("ratio_min") is None:
    return ""
  return f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}x ({r['num_pairs']} pairs)"


def table(records: list[dict[str, Any]]) -> str:
  """The records as an aligned text table."""
  rows = [("workload", "ours", "peer", "ratio", "spread", "target", "met")]
  for r in records:
    met = {True: "yes", False: "NO", None: ""}[r["meets_target"]]
    rows.append(
      (
        r["workload"],
        _format(r["ours"], r["unit"]),
        _format(r["peer"], r["unit"]),
        "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
        _spread(r),
        r["target"] or "",
        met,
      )
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
  return "\n".join(line.rstrip() for line in lines)


def markdown_table(records: list[dict[str, Any]]) -> str:
  """The records as a Markdown table (the README's); spread: the pairs' min-max ratio."""
  lines = [
    "| workload | ours | diffusers | ratio | spread | target | met |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in records:
    met = {True: "yes", False: "no", None: ""}[r["meets_target"]]
    ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    lines.append(
      f"| `{r['workload']}` | {_format(r['ours'], r['unit'])} | "
      f"{_format(r['peer'], r['unit'])} | {ratio} | {_spread(r)} | {r['target'] or ''} | {met} |"
    )
  return "\n".join(lines)


def _pair_line(pair: dict[str, Any]) -> str:
  """'ours 54.1 (71.2 s), peer 50.3 (48.9 s), ratio 1.08x' of one pair."""

  def side(name: str) -> str:
    value = "-" if pair[name] is None else f"{pair[name]:.4g}"
    return f"{name} {value} ({pair.get(name + '_s', '-')} s)"

  ratio = "-" if pair["ratio"] is None else f"{pair['ratio']:.2f}x"
  return f"{side('ours')}, {side('peer')}, ratio {ratio}"


def machine() -> dict[str, Any]:
  cpu = platform.processor()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = re.findall(r"model name\s*:\s*(.*)", f.read())
    cpu = names[0] if names else cpu
  return dict(
    host=socket.gethostname(),
    cpu=cpu,
    cpu_count=os.cpu_count(),
    python=platform.python_version(),
    platform=platform.platform(),
  )


def results_path(
  directory: str = RESULTS_DIR, now: datetime.datetime | None = None, suite: str = ""
) -> str:
  """`<directory>/<host>[-<suite>]-<date>.json`: the accelerator suite never overwrites the CPU
  suite's file of a host with the same name."""
  now = now or datetime.datetime.now()
  host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
  return os.path.join(directory, f"{host}{'-' + suite if suite else ''}-{now:%Y-%m-%d}.json")


def write_results(path: str, records: list[dict[str, Any]], quick: bool) -> None:
  """The results file: date, machine and the records (rewritten after each workload, so a run
  that is stopped keeps what it measured)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(
      dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        quick=quick,
        machine=machine(),
        records=records,
      ),
      f,
      indent=2,
    )
    f.write("\n")


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
  p.add_argument(
    "--quick", action="store_true", help="The subset with targets, shorter timings, 2 pairs."
  )
  p.add_argument("--only", default="", help="Comma-separated workload names.")
  p.add_argument(
    "--accelerator",
    action="store_true",
    help="The GPU/TPU suite instead: bfloat16 at full batch, 50,000 samples.",
  )
  p.add_argument(
    "--timeout_s",
    type=int,
    default=0,
    help="Per-side time limit of each workload (default: the workload's own).",
  )
  p.add_argument(
    "--pairs",
    type=int,
    default=0,
    help=f"Interleaved (ours, peer) pairs of processes per workload with a peer (default "
    f"{PAIRS}, --quick {QUICK_PAIRS}).",
  )
  p.add_argument(
    "--out", default="", help="Result file (default benchmarks/results/<host>-<date>.json)."
  )
  p.add_argument(
    "--show",
    default="",
    metavar="RESULTS_JSON",
    help="Print a results file as a Markdown table and exit.",
  )
  args = p.parse_args(argv)
  if args.show:
    with open(args.show) as f:
      print(markdown_table(json.load(f)["records"]))
    return
  with_peer = peer.available()
  if not with_peer:
    print(
      'The peer (torch, diffusers) is not installed: pip install -e ".[bench]". Running our '
      "side only.",
      flush=True,
    )
  with tempfile.TemporaryDirectory(prefix="ddpm_jax_bench_cache_") as cache_dir:
    suite = accelerator_workloads() if args.accelerator else workloads(cache_dir)
    names = {w.name for w in suite}
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - names)
    if unknown:
      raise SystemExit(f"Unknown workloads {unknown}; known: {sorted(names)}")
    selected = [w for w in suite if (w.name in only if only else (w.in_quick or not args.quick))]
    with_peer = with_peer and not args.accelerator
    path = args.out or results_path(suite="accelerator" if args.accelerator else "")
    records: list[dict[str, Any]] = []

    def progress(partial: dict[str, Any]) -> None:  # After each pair: the file keeps it.
      pair = partial["pairs"][-1]
      print(
        f"  pair {len(partial['pairs'])}/{partial['num_pairs']}: {_pair_line(pair)}", flush=True
      )
      write_results(path, [*records, partial], args.quick)

    for w in selected:
      print(f"[{datetime.datetime.now():%H:%M:%S}] {w.name}: {w.description}", flush=True)
      records.append(
        run_workload(w, args.quick, with_peer, args.timeout_s or None, args.pairs or None, progress)
      )
      for error in records[-1].get("errors", []):
        print(f"  error: {error}", flush=True)
      write_results(path, records, args.quick)
  records += derived_records(records)
  print(table(records), flush=True)
  write_results(path, records, args.quick)
  print(f"Wrote {path}", flush=True)


if __name__ == "__main__":
  main()
