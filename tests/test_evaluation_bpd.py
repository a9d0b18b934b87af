"""Tests of the rate-distortion curve (Table 4, Fig. 5) and the resumable bits/dim evaluation."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config
from PIL import Image

from ddpm_jax import diffusion as diff
from ddpm_jax.checkpoints import readers
from ddpm_jax.config.validation import ConfigError
from ddpm_jax.data import pipeline
from ddpm_jax.evaluation import bpd
from ddpm_jax.evaluation import rate_distortion as rd
from ddpm_jax.training import loop as train_loop

# -- The rate-distortion curve on synthetic terms. ---------------------------------------------


def synthetic_outputs(batch=3, num_timesteps=10, seed=0):
  rng = np.random.default_rng(seed)
  terms = rng.uniform(0.0, 1.0, (batch, num_timesteps))
  mse = rng.uniform(0.0, 0.5, (batch, num_timesteps))
  prior = rng.uniform(0.0, 1e-3, batch)
  return terms, mse, prior


def test_rate_is_cumulative_from_the_prior_in_reverse_time():
  terms, mse, prior = synthetic_outputs()
  num_timesteps = terms.shape[1]
  curve = rd.rate_distortion(terms, mse, prior)
  np.testing.assert_array_equal(curve.reverse_time, np.arange(1, num_timesteps + 1))
  mean_terms = terms.mean(0)
  for k in range(1, num_timesteps + 1):
    t = num_timesteps - k  # The receiver holds x_t after k reverse steps.
    received = sum(mean_terms[s] for s in range(t + 1, num_timesteps))
    assert curve.rate[k - 1] == pytest.approx(prior.mean() + received, rel=1e-12)
  assert curve.rate[0] == pytest.approx(prior.mean())  # Only x_{T-1}: the prior.
  assert np.all(np.diff(curve.rate) >= 0)
  # The decoder term L_0 is the lossless remainder: rate at reverse time T + L_0 = total bpd.
  total = terms.sum(1) + prior
  assert curve.rate[-1] + mean_terms[0] == pytest.approx(total.mean(), rel=1e-12)
  assert curve.rate[-1] < total.mean()


def test_distortion_is_the_rmse_of_the_batch_mean_mse_on_the_0_255_scale():
  terms, mse, prior = synthetic_outputs()
  curve = rd.rate_distortion(terms, mse, prior)
  num_timesteps = terms.shape[1]
  for k in range(1, num_timesteps + 1):
    expected = 127.5 * math.sqrt(mse[:, num_timesteps - k].mean())
    assert curve.distortion[k - 1] == pytest.approx(expected, rel=1e-12)
  # sqrt of the mean, not the mean of per-image RMSEs: images with mse 0 and 1 give 127.5/sqrt 2.
  two = rd.rate_distortion(np.zeros((2, 1)), np.array([[0.0], [1.0]]), np.zeros(2))
  assert two.distortion[0] == pytest.approx(127.5 / math.sqrt(2))


@pytest.mark.parametrize(
  "num_timesteps, expected",
  [
    (1000, [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]),
    (20, [20, 18, 16, 14, 12, 10, 8, 6, 4, 2]),
    (5, [5, 4, 3, 2, 1]),
  ],
)
def test_table_rows_at_the_papers_reverse_times(num_timesteps, expected):
  curve = rd.rate_distortion(*synthetic_outputs(num_timesteps=num_timesteps))
  rows = curve.table()
  assert [k for k, _, _ in rows] == expected
  for k, rate, distortion in rows:
    assert (rate, distortion) == (curve.rate[k - 1], curve.distortion[k - 1])
  assert [k for k, _, _ in curve.table(every=3)] == list(range(num_timesteps, 0, -3))


# -- On a real calc_bpd_loop: Gaussian data and its optimal denoiser. ---------------------------

MU, S = 0.1, 0.3  # Per-dimension data distribution N(MU, S^2).


def optimal_eps_model(d):
  """E[eps | x_t] for x_0 ~ N(MU, S^2) (as in test_diffusion.py)."""

  def model_fn(x, t):
    abar = jnp.asarray(d.alphas_cumprod, jnp.float32)[t].reshape(-1, 1, 1, 1)
    mean, var = jnp.sqrt(abar) * MU, abar * S**2 + 1 - abar
    return jnp.sqrt(1 - abar) * (x - mean) / var

  return model_fn


def test_rate_and_distortion_of_the_optimal_denoiser_follow_the_closed_form():
  betas = diff.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
  d = diff.GaussianDiffusion(betas=betas)
  x = np.random.default_rng(0).normal(MU, S, (512, 2, 2, 1))
  x0 = jnp.asarray(np.clip(np.round((x + 1) * 127.5), 0, 255) / 127.5 - 1, jnp.float32)
  out = jax.jit(lambda x, r: d.calc_bpd_loop(optimal_eps_model(d), x, r, clip_denoised=False))(
    x0, jax.random.PRNGKey(0)
  )
  curve = rd.rate_distortion(out["terms_bpd"], out["mse"], out["prior_bpd"])
  # Every KL term is >= 0, up to float32 round-off (about -1e-7) where the terms are ~1e-7.
  assert np.all(np.diff(curve.rate) >= -1e-6)
  assert curve.rate[-1] > 100 * curve.rate[0] > 0
  rows = curve.table()
  # Distortion falls as reverse time grows; before reverse time ~500 it saturates at S * 127.5
  # (x_t holds almost nothing of x_0), so only the first half of the table is strictly ordered.
  distortions = [dist for _, _, dist in rows[:5]]
  assert all(a < b for a, b in zip(distortions, distortions[1:], strict=False))
  # The optimal x0 error at step t has variance S^2 (1 - abar) / (abar S^2 + 1 - abar).
  abar = d.alphas_cumprod
  expected = 127.5 * np.sqrt(S**2 * (1 - abar) / (abar * S**2 + 1 - abar))
  for k, _, distortion in rows:
    assert distortion == pytest.approx(expected[1000 - k], rel=0.02)
  assert curve.rate[-1] == pytest.approx(
    float(jnp.mean(out["total_bpd"] - out["terms_bpd"][:, 0])), rel=1e-5
  )


def read_lines(path):
  with open(path) as f:
    return f.read().splitlines()


# -- Files. ------------------------------------------------------------------------------------


def test_csv_holds_the_rows(tmp_path):
  curve = rd.rate_distortion(*synthetic_outputs(num_timesteps=20))
  path = str(tmp_path / "sub" / "rd.csv")
  rd.write_csv(path, curve.table())
  lines = read_lines(path)
  assert lines[0] == "reverse_time,rate_bits_per_dim,distortion_rmse"
  assert len(lines) == 11
  for line, (k, rate, distortion) in zip(lines[1:], curve.table(), strict=True):
    got = line.split(",")
    assert int(got[0]) == k
    assert float(got[1]) == pytest.approx(rate, rel=1e-8)
    assert float(got[2]) == pytest.approx(distortion, rel=1e-8)
  assert os.listdir(tmp_path / "sub") == ["rd.csv"]  # No temporary file left behind.


def test_png_has_three_panels_with_curves_and_axes(tmp_path):
  curve = rd.rate_distortion(*synthetic_outputs(num_timesteps=50))
  path = str(tmp_path / "rd.png")
  returned = rd.plot_png(path, curve.rate, curve.distortion)
  image = Image.open(path)
  width, height = rd.PANEL_SIZE
  assert image.size == (3 * width, height) and image.mode == "RGB"
  pixels = np.asarray(image)
  np.testing.assert_array_equal(pixels, returned)
  for i in range(3):
    panel = pixels[:, i * width : (i + 1) * width]
    is_line = np.all(panel == rd.LINE_COLOR, axis=-1)
    assert is_line.sum() > 100, f"panel {i} has no curve"
    dark = panel.max(axis=-1) < 64  # Axes, ticks and labels (antialiased text).
    assert dark.sum() > 500, f"panel {i} has no axes or labels"


# -- The evaluation job on a tiny trained digits model. -----------------------------------------


def eval_config(data_dir, **overrides):
  """The tiny digits config with a one-level U-Net (fast to compile), T = 20, 24 test images."""
  return tiny_digits_config(
    **{
      "data.data_dir": data_dir,
      "model.ch_mult": (1,),
      "model.attn_resolutions": (),
      "training.num_train_steps": 2,
      "eval.num_examples": 24,
      "eval.batch_size": 8,
      **overrides,
    }
  )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A workdir with the checkpoint of a 2-step digits run and one finished evaluation."""
  workdir = str(tmp_path_factory.mktemp("wd"))
  train_loop.train_and_evaluate(eval_config(data_dir), workdir)
  summary = bpd.run_bpd_eval(eval_config(data_dir), workdir)
  return workdir, summary


def read_per_image_csv(out_dir):
  lines = read_lines(os.path.join(out_dir, "bpd_per_image.csv"))
  assert lines[0] == "index,total_bpd,prior_bpd,decoder_bpd"
  return np.array([[float(v) for v in line.split(",")] for line in lines[1:]])


def read_json(out_dir):
  with open(os.path.join(out_dir, "bpd.json")) as f:
    return f.read()


def test_bpd_eval_writes_consistent_results(trained):
  workdir, summary = trained
  out_dir = os.path.join(workdir, "eval_2")
  assert summary["step"] == 2 and summary["eval_dir"] == out_dir
  saved = json.loads(read_json(out_dir))
  per_image = read_per_image_csv(out_dir)
  np.testing.assert_array_equal(per_image[:, 0], np.arange(24))
  bpd = per_image[:, 1]
  assert np.all(np.isfinite(per_image)) and np.all(bpd > 0) and np.all(per_image[:, 2] > 0)
  assert saved["n"] == 24 and saved["split"] == "test"
  assert saved["mean"] == pytest.approx(bpd.mean(), rel=1e-6)
  assert saved["stderr"] == pytest.approx(bpd.std() / math.sqrt(24), rel=1e-5)
  assert saved["stderr"] > 0 and summary["mean"] == saved["mean"]
  assert len(saved["terms_bpd_mean"]) == 20 and len(saved["mse_mean"]) == 20
  assert saved["mean"] == pytest.approx(
    sum(saved["terms_bpd_mean"]) + saved["prior_bpd_mean"], rel=1e-5
  )
  assert [row[0] for row in saved["rate_distortion"]] == list(range(20, 0, -2))
  chunks = sorted(os.listdir(os.path.join(out_dir, "bpd")))
  assert chunks == ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz", "meta.json"]
  with np.load(os.path.join(out_dir, "bpd", "chunk_00001.npz")) as chunk:
    np.testing.assert_array_equal(chunk["index"], np.arange(8, 16))
    assert chunk["terms_bpd"].shape == (8, 20) and chunk["terms_bpd"].dtype == np.float32
    np.testing.assert_allclose(
      chunk["total_bpd"], chunk["terms_bpd"].sum(1) + chunk["prior_bpd"], rtol=1e-5
    )
  rd_lines = read_lines(os.path.join(out_dir, "rate_distortion.csv"))
  assert len(rd_lines) == 21 and rd_lines[1].startswith("20,")
  assert Image.open(os.path.join(out_dir, "rate_distortion.png")).size == (
    3 * rd.PANEL_SIZE[0],
    rd.PANEL_SIZE[1],
  )
  events = os.listdir(os.path.join(workdir, "eval"))
  assert any(name.startswith("events.out.tfevents") for name in events)


def test_rerun_skips_existing_chunks_and_recomputes_deleted_ones(trained, data_dir):
  workdir, _ = trained
  out_dir = os.path.join(workdir, "eval_2")
  chunk_dir = os.path.join(out_dir, "bpd")
  before = read_json(out_dir)
  with np.load(os.path.join(chunk_dir, "chunk_00001.npz")) as chunk:
    deleted_values = {name: chunk[name] for name in chunk.files}
  mtimes = {
    name: os.stat(os.path.join(chunk_dir, name)).st_mtime_ns for name in os.listdir(chunk_dir)
  }
  bpd.run_bpd_eval(eval_config(data_dir), workdir)
  assert {
    name: os.stat(os.path.join(chunk_dir, name)).st_mtime_ns for name in os.listdir(chunk_dir)
  } == mtimes
  assert read_json(out_dir) == before
  os.remove(os.path.join(chunk_dir, "chunk_00001.npz"))
  bpd.run_bpd_eval(eval_config(data_dir), workdir, step=2)
  with np.load(os.path.join(chunk_dir, "chunk_00001.npz")) as chunk:
    for name, value in deleted_values.items():
      np.testing.assert_array_equal(chunk[name], value, err_msg=name)
  for name in ("chunk_00000.npz", "chunk_00002.npz"):
    assert os.stat(os.path.join(chunk_dir, name)).st_mtime_ns == mtimes[name]
  assert read_json(out_dir) == before


def test_results_do_not_depend_on_the_batch_size(trained, data_dir, tmp_path):
  workdir, summary = trained
  other = str(tmp_path / "wd")
  shutil.copytree(workdir, other)  # With the chunks of batch size 8, which must be replaced.
  summary_12 = bpd.run_bpd_eval(eval_config(data_dir, **{"eval.batch_size": 12}), other)
  assert sorted(os.listdir(os.path.join(other, "eval_2", "bpd"))) == [
    "chunk_00000.npz",
    "chunk_00001.npz",
    "meta.json",
  ]
  with np.load(os.path.join(other, "eval_2", "bpd", "chunk_00001.npz")) as chunk:
    np.testing.assert_array_equal(chunk["index"], np.arange(12, 24))
  np.testing.assert_allclose(
    read_per_image_csv(os.path.join(other, "eval_2")),
    read_per_image_csv(os.path.join(workdir, "eval_2")),
    rtol=1e-5,
  )
  assert summary_12["mean"] == pytest.approx(summary["mean"], rel=1e-5)


def test_missing_checkpoint_is_one_clear_error(trained, data_dir, tmp_path):
  with pytest.raises(readers.NoCheckpointError, match="Train first"):
    bpd.run_bpd_eval(eval_config(data_dir), str(tmp_path / "empty"))
  assert not os.path.exists(tmp_path / "empty" / "checkpoints")
  with pytest.raises(readers.NoCheckpointError, match=r"step 7 .*available steps: \[2\]"):
    bpd.run_bpd_eval(eval_config(data_dir), trained[0], step=7)


# -- Example indices across processes. ---------------------------------------------------------


def make_image_folder(path, count):
  os.makedirs(path)
  for i in range(count):
    Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(os.path.join(path, f"{i:02d}.png"))
  return str(path)


@pytest.mark.parametrize("source", ["tfds", "folder"])
def test_global_example_index_matches_the_single_process_order(source, data_dir, tmp_path):
  if source == "tfds":
    config = eval_config(data_dir, **{"eval.num_examples": 11})
    pipeline.prepare_embedded_dataset(config)
  else:
    folder = make_image_folder(tmp_path / "images", 11)
    config = eval_config(folder, **{"data.dataset": "folder", "eval.num_examples": -1})

  def images(process_index, process_count):
    batches = pipeline.create_eval_dataset(
      config,
      process_index=process_index,
      process_count=process_count,
      batch_size_per_process=4,
      num_examples=config.eval.num_examples,
    )
    x, mask = (np.concatenate(a) for a in zip(*batches, strict=True))
    return x[mask]

  whole = images(0, 1)
  assert len(whole) == 11 and len({float(x.sum()) for x in whole}) > 5
  seen = []
  for p in range(3):
    local = images(p, 3)
    index = bpd.global_example_index(
      config, np.arange(len(local)), process_index=p, process_count=3
    )
    np.testing.assert_array_equal(local, whole[index])
    seen.extend(index)
  assert sorted(seen) == list(range(11))


@pytest.mark.parametrize("field, value", [("eval.batch_size", 0), ("eval.num_examples", 0)])
def test_bad_eval_fields_are_config_errors(field, value, tmp_path):
  with pytest.raises(ConfigError, match=f"config.{field}={value}"):
    bpd.run_bpd_eval(eval_config(str(tmp_path), **{field: value}), str(tmp_path / "wd"))
