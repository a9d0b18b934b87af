"""Runs the Colab notebooks top to bottom in test mode and checks what their cells print and show.

Each notebook runs once per module in its own kernel (the interpreter running pytest) with
DDPM_NOTEBOOK_SMALL=1 (tiny settings, no download) on one CPU device, in a temporary working
directory, so nothing is written into the repository. The cells are found by their `cell_id`
metadata (`# %% cell_id="train"` in the notebook's jupytext source notebooks/<name>.py), which
jupytext keeps; nbformat's cell ids it does not. Faster tests check that each .ipynb is what
jupytext makes of its source, that no placeholder is left, and the install cell's three paths.
"""

import base64
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jupytext
import nbformat
import numpy as np
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
NAMES = ("quickstart", "sample_official_weights", "diffusion_explained", "export_to_diffusers")
# The command that writes notebooks/*.ipynb from notebooks/*.py (notebooks/README.md).
REGENERATE = "jupytext --update --to ipynb notebooks/*.py"
KERNEL_NAME = "ddpm_jax_test_python"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
  """A kernelspec running this very interpreter (sys.executable), so the kernel sees the same
  packages as the tests whatever kernelspecs the machine has."""
  kernels = tmp_path_factory.mktemp("jupyter") / "kernels"
  spec_dir = kernels / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "ddpm_jax tests",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return [str(kernels)]


def kernel_env(tmp_path) -> dict[str, str]:
  env = dict(os.environ)
  # One CPU device, as on Colab; conftest's simulated devices are for the distributed tests.
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env.update(
    DDPM_NOTEBOOK_SMALL="1",
    # The repository's configs/ and ddpm_jax/ first, as pytest's own sys.path has them.
    PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=flags.strip(),
    TF_CPP_MIN_LOG_LEVEL="2",
    IPYTHONDIR=str(tmp_path / "ipython"),
    PYDEVD_DISABLE_FILE_VALIDATION="1",
  )
  return env


def execute(name: str, kernel_dirs, tmp_path) -> nbformat.NotebookNode:
  """Executes notebooks/<name>.ipynb with cwd `tmp_path`; raises at the first failing cell."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  km = KernelManager(
    kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs)
  )
  client = NotebookClient(
    nb,
    km=km,
    kernel_name=KERNEL_NAME,
    timeout=CELL_TIMEOUT_S,
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute(env=kernel_env(tmp_path))
  return nb


def run_in_tmp(name: str):
  """A module fixture: (the executed notebook, its working directory)."""

  @pytest.fixture(scope="module")
  def fixture(kernel_dirs, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(name)
    before = set(os.listdir(REPO))
    nb = execute(name, kernel_dirs, tmp_path)
    written = [n for n in set(os.listdir(REPO)) - before if n.startswith("ddpm_")]
    assert not written, f"the notebook wrote {written} into the repository"
    return nb, tmp_path

  return fixture


quickstart = run_in_tmp("quickstart")
sample_official_weights = run_in_tmp("sample_official_weights")
diffusion_explained = run_in_tmp("diffusion_explained")
export_to_diffusers = run_in_tmp("export_to_diffusers")


# -- Reading outputs. --------------------------------------------------------------------------


def cell_id(c) -> str | None:
  """The name a cell has in its metadata: `# %% cell_id="..."` in the jupytext source."""
  return c.metadata.get("cell_id")


def cell(nb, name: str):
  matches = [c for c in nb.cells if cell_id(c) == name]
  assert len(matches) == 1, f"{len(matches)} cells with cell_id {name!r}"
  return matches[0]


def stdout(nb, cell_id: str) -> str:
  return "".join(
    o.get("text", "")
    for o in cell(nb, cell_id).outputs
    if o.output_type == "stream" and o.name == "stdout"
  )


def pngs(nb, cell_id: str) -> list[np.ndarray]:
  """The image/png outputs of a cell, decoded."""
  return [
    np.asarray(Image.open(io.BytesIO(base64.b64decode(o.data["image/png"]))))
    for o in cell(nb, cell_id).outputs
    if o.output_type in ("display_data", "execute_result") and "image/png" in o.data
  ]


def number(text: str, pattern: str) -> float:
  match = re.search(pattern, text)
  assert match, f"{pattern!r} not in:\n{text}"
  return float(match.group(1))


def assert_no_errors(nb):
  errors = [
    (cell_id(c), o.get("ename"), o.get("evalue"))
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if o.output_type == "error"
  ]
  assert not errors
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


def grid_size(n: int, size: int = 8, scale: int = 6, padding: int = 2) -> int:
  cols = math.ceil(math.sqrt(n))
  return (cols * (size + padding) + padding) * scale


# -- The notebooks are what jupytext makes of their sources. ----------------------------------


def read_ipynb(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)


def from_source(name: str) -> nbformat.NotebookNode:
  """notebooks/<name>.ipynb as `jupytext --to ipynb` writes it from notebooks/<name>.py."""
  source = jupytext.read(os.path.join(NOTEBOOKS, f"{name}.py"))
  return nbformat.reads(jupytext.writes(source, fmt="ipynb"), as_version=4)


def test_each_notebook_has_its_source():
  files = os.listdir(NOTEBOOKS)
  assert sorted(f for f in files if f.endswith(".ipynb")) == sorted(f"{n}.ipynb" for n in NAMES)
  # Every .py is a notebook source, so the command in notebooks/README.md stays right.
  assert sorted(f for f in files if f.endswith(".py")) == sorted(f"{n}.py" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_in_sync_with_its_source(name):
  stored, expected = read_ipynb(name), from_source(name)
  stale = (
    f"notebooks/{name}.ipynb differs from notebooks/{name}.py: regenerate it with "
    f"`{REGENERATE}` from the repository root (see notebooks/README.md)"
  )
  summary = lambda nb: [(c.cell_type, c.metadata, c.source) for c in nb.cells]
  assert summary(stored) == summary(expected), stale
  assert stored.metadata == expected.metadata, stale  # Colab's runtime and accelerator.
  assert all(not c.get("outputs") and not c.get("execution_count") for c in stored.cells), (
    f"notebooks/{name}.ipynb is stored with outputs: {stale}"
  )
  names = [cell_id(c) for c in stored.cells if cell_id(c)]
  assert len(names) == len(set(names)), f"{name}: cell_id names repeat: {names}"
  assert cell_id(stored.cells[1]) == "params" and "DDPM_NOTEBOOK_SMALL" in stored.cells[1].source


PLACEHOLDER = re.compile(
  r"<(org|owner|user|username|repo_url|your[^>]*)>|\b(TODO|FIXME|XXX)\b", re.IGNORECASE
)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_has_no_placeholders_or_broken_links(name):
  for ext in ("py", "ipynb"):
    with open(os.path.join(NOTEBOOKS, f"{name}.{ext}"), encoding="utf-8") as f:
      found = [m.group(0) for m in PLACEHOLDER.finditer(f.read())]
    assert not found, f"notebooks/{name}.{ext} has placeholders: {found}"
  for c in read_ipynb(name).cells:
    if c.cell_type == "markdown":
      for target in re.findall(r"\]\(([^)]*)\)", c.source):
        assert re.fullmatch(r"https://[^\s<>]+", target), f"{name}: link to {target!r}"


def run_install_cell(name: str, monkeypatch, *, cwd, repo_url: str, importable: bool):
  """Runs the notebook's install cell with pip and git faked; returns the commands it ran."""
  real_find_spec, commands = importlib.util.find_spec, []

  def find_spec(module, package=None):
    installed = any("pip" in command for command in commands)
    if module in ("ddpm_jax", "configs") and not (importable or installed):
      return None
    return real_find_spec(module, package)

  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  monkeypatch.setattr(subprocess, "check_call", commands.append)
  monkeypatch.setattr(shutil, "which", lambda command: None)  # No nvidia-smi: the cpu extra.
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(cwd)
  exec(cell(read_ipynb(name), "install").source, {"os": os, "REPO_URL": repo_url})
  return commands


@pytest.mark.parametrize("name", NAMES)
def test_install_cell(name, monkeypatch, tmp_path):
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  assert 'REPO_URL = ""' in cell(read_ipynb(name), "params").source  # No URL is published.
  # Importable: nothing to install.
  assert run_install_cell(name, monkeypatch, cwd=tmp_path, repo_url="", importable=True) == []
  # Inside a checkout: an editable install of it, importable at once with its configs/.
  commands = run_install_cell(name, monkeypatch, cwd=NOTEBOOKS, repo_url="", importable=False)
  assert commands == [[*pip, "-e", f"{REPO}[cpu]"]] and sys.path[0] == REPO
  # Elsewhere (Colab): a clone of REPO_URL (for configs/ too), or one message saying to set it.
  url = "https://example.com/ddpm_jax.git"
  clone = str(tmp_path / "ddpm_jax_repo")
  commands = run_install_cell(name, monkeypatch, cwd=tmp_path, repo_url=url, importable=False)
  assert commands == [["git", "clone", "--depth=1", url, clone], [*pip, "-e", f"{clone}[cpu]"]]
  assert sys.path[0] == clone
  with pytest.raises(ValueError, match="set REPO_URL in the first cell to the git URL"):
    run_install_cell(name, monkeypatch, cwd=tmp_path, repo_url="", importable=False)


# -- quickstart.ipynb. -------------------------------------------------------------------------


def test_quickstart_trains_and_samples(quickstart):
  nb, tmp_path = quickstart
  assert_no_errors(nb)
  assert "trained to step 4;" in stdout(nb, "train")
  losses = stdout(nb, "loss")
  assert "step     2  loss" in losses and "step     4  loss" in losses  # Logged every 2 steps.
  for pattern in (r"final loss (\S+) \(training batches, step 4\)", r"test loss (\S+)"):
    assert 0.0 < number(losses, pattern) < 5.0
  assert "samples shape (16, 8, 8, 1)" in stdout(nb, "ancestral")
  low = number(stdout(nb, "ancestral"), r"values in \[(\S+),")
  high = number(stdout(nb, "ancestral"), r"values in \[\S+, (\S+)\]")
  assert -1.0 <= low <= high <= 1.0  # Clipped predictions keep the samples in range.
  assert "ddim samples shape (16, 8, 8, 1) (10 steps, eta 0)" in stdout(nb, "ddim")
  # T = 20 and 10 snapshots: predictions at t = 18, 16, ..., 0, then the sample.
  assert "progressive table shape (8, 11, 8, 8, 1)" in stdout(nb, "progressive")
  for cell_id, shape in [
    ("data", (2 * 10 + 2, 16 * 10 + 2)),
    ("ancestral", (42, 42)),
    ("ddim", (42, 42)),
    ("progressive", (8 * 10 + 2, 11 * 10 + 2)),
  ]:
    (image,) = pngs(nb, cell_id)
    assert image.shape[:2] == (shape[0] * 6, shape[1] * 6), cell_id
  assert grid_size(16) == 42 * 6
  assert os.path.isdir(tmp_path / "ddpm_quickstart" / "checkpoints" / "4")  # WORKDIR is in cwd.


# -- sample_official_weights.ipynb. -----------------------------------------------------------


def test_sample_official_weights_converts_and_samples(sample_official_weights):
  nb, tmp_path = sample_official_weights
  assert_no_errors(nb)
  assert "images (16, 16, 3), U-Net of" in stdout(nb, "config")
  synthetic = stdout(nb, "synthetic")
  assert "diffusers tensors; converting" in synthetic and "safetensors" in synthetic
  workdir = tmp_path / "ddpm_cifar10_diffusers"
  assert f"wrote {workdir}/checkpoints/0" in stdout(nb, "convert")
  assert "python -m ddpm_jax.convert --source=diffusers" in stdout(nb, "convert")
  check = stdout(nb, "check")
  assert "restored step 0;" in check
  assert number(check, r"output std (\S+)") > 0.1  # Random weights: far from a zero output.
  diff = number(
    check,
    r"max abs diff between the outputs of the converted model and of the "
    r"source weights: (\S+)",
  )
  assert diff <= 1e-4
  assert "skipped" in stdout(nb, "check_torch")
  assert "samples shape (16, 16, 16, 3) uint8" in stdout(nb, "sample")
  (grid,) = pngs(nb, "sample")
  assert grid.shape == ((4 * 18 + 2) * 8, (4 * 18 + 2) * 8, 3)
  (grid_png,) = workdir.glob("samples_step0_ddim_10steps_eta0_seed1_*/grid.png")
  assert grid_png.is_file()


# -- diffusion_explained.ipynb. ----------------------------------------------------------------


def test_diffusion_explained_tables(diffusion_explained):
  nb, _ = diffusion_explained
  assert_no_errors(nb)
  forward = stdout(nb, "forward")
  assert "t = 999: sqrt(abar_t) = 0.0064, sqrt(1 - abar_t) = 1.0000" in forward
  assert "linear: abar_999 = 4.0358e-05" in stdout(nb, "schedules")
  posterior = stdout(nb, "posterior")
  assert "beta~_1 = 5.4532e-05" in posterior
  assert "posterior_log_variance_clipped[0] = -9.81673" in posterior
  # The simulated chains of eq. 2 match eq. 4 (100,000 chains: standard errors about 0.003).
  for line in stdout(nb, "markov").splitlines():
    mean, mean_ref, std, std_ref = map(float, re.findall(r"[+-]?\d+\.\d+", line))
    assert abs(mean - mean_ref) < 0.01 and abs(std - std_ref) < 0.01, line


def test_diffusion_explained_bound_and_rate_distortion(diffusion_explained):
  nb, _ = diffusion_explained
  assert "samples shape (16, 8, 8, 1)" in stdout(nb, "gaussian")
  bpd = stdout(nb, "bpd")
  totals = {}
  for var_type in ("fixedlarge", "fixedsmall"):
    totals[var_type] = number(bpd, var_type + r": total (\S+) bits/dim")
    prior = number(bpd, var_type + r": .* prior (\S+) \+")
    assert 0.5 < totals[var_type] < 8.0
    assert 0.0 < prior < 1e-4  # L_T: about 1e-5 bits/dim for the linear schedule.
  rd = stdout(nb, "rd")
  rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\S+)$", rd, re.MULTILINE)
  assert [int(k) for k, _, _ in rows] == list(range(1000, 0, -100))
  rates = [float(r) for _, r, _ in rows]
  assert rates == sorted(rates, reverse=True)  # Rate grows with the reverse steps received.
  rate, decoder, total = (
    number(rd, p) for p in (r"rate at T (\S+)", r"decoder (\S+)", r"total (\S+) bits/dim")
  )
  assert abs(rate + decoder - total) < 2e-4 and abs(total - totals["fixedlarge"]) < 1e-3


def test_diffusion_explained_images(diffusion_explained):
  nb, _ = diffusion_explained
  (forward,) = pngs(nb, "forward")
  assert forward.shape[:2] == (12 * 8, (8 * 10 + 2) * 8)  # One row of 8 noised digits.
  for cell_id in ("schedules", "posterior", "bpd"):
    (plot,) = pngs(nb, cell_id)
    assert plot.shape == (300, 640, 3) and plot.min() < 100, cell_id  # Something was drawn.
  (samples,) = pngs(nb, "gaussian")
  assert samples.shape[:2] == (grid_size(16), grid_size(16))
  (fig5,) = pngs(nb, "rd")
  assert fig5.shape == (280, 3 * 360, 3)


# -- export_to_diffusers.ipynb. ---------------------------------------------------------------


def test_export_to_diffusers_exports_and_samples_in_pytorch(export_to_diffusers):
  nb, tmp_path = export_to_diffusers
  assert_no_errors(nb)
  run = tmp_path / "ddpm_export_tiny_run"
  assert f"run {run}: digits (8, 8, 1), T = 20, linear betas" in stdout(nb, "run")
  export = stdout(nb, "export")
  assert f"wrote {tmp_path / 'ddpm_digits_diffusers'} from step 4:" in export
  for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md"):
    assert f"  {name} " in export
  assert "python -m ddpm_jax.convert --to=diffusers" in export
  assert stdout(nb, "card").startswith("## Weights\n\n- Step 4 of the run")
  assert "tensors, " in stdout(nb, "round_trip")
  assert stdout(nb, "round_trip").rstrip().endswith("bit for bit equal: True")
  if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("torch") is None:
    assert stdout(nb, "torch_load").startswith("skipped")
    assert stdout(nb, "torch_sample").startswith("skipped")
    return
  loaded = stdout(nb, "torch_load")
  assert "UNet2DModel of " in loaded and "DDPMScheduler: T = 20, linear betas, epsilon" in loaded
  assert number(loaded, r"UNet2DModel and ours: (\S+)") <= 1e-4
  sampled = stdout(nb, "torch_sample")
  assert "diffusers samples (16, 8, 8, 1)" in sampled
  low, high = (number(sampled, p) for p in (r"values in \[(\S+),", r"values in \[\S+, (\S+)\]"))
  assert 0.0 <= low <= high <= 1.0
  (grid,) = pngs(nb, "torch_sample")
  assert grid.shape[:2] == (grid_size(16), grid_size(16))
