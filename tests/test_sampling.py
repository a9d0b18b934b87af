"""--mode=sample and the paper's figures, on a tiny digits model trained for two steps (T=20)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config
from PIL import Image

from ddpm_jax import image_grid, model_bundle, parallel
from ddpm_jax.checkpoints import readers
from ddpm_jax.config.validation import ConfigError, validate_config
from ddpm_jax.sampling import figures, samplers, shards
from ddpm_jax.training import loop as train_loop

NUM_SAMPLES, BATCH = 10, 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config factory, workdir) of a run trained for 2 steps, checkpoint at step 2."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("wd"))

  def config(**overrides):
    base = {
      "data.data_dir": data_dir,
      "training.num_train_steps": 2,
      "training.checkpoint_every_steps": 2,
      "sample.num_samples": NUM_SAMPLES,
      "sample.batch_size": BATCH,
    }
    return tiny_digits_config(**(base | overrides))

  train_loop.train_and_evaluate(config(), workdir)
  return config, workdir


def read_shard(path):
  with np.load(path) as npz:
    return npz["images"], npz["indices"]


def shard_files(directory):
  return sorted(f for f in os.listdir(directory) if f.startswith("shard_"))


def mtimes(directory):
  return {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in os.listdir(directory)}


def assert_close_uint8(a, b):
  """Equal up to a rare off-by-one where float noise crosses a rounding boundary."""
  diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
  assert diff.max() <= 1 and np.mean(diff == 0) > 0.99, (diff.max(), np.mean(diff == 0))


# -- run_sampling. -----------------------------------------------------------------------------


def test_run_sampling_writes_shards_resumes_and_regenerates_the_same_bytes(trained):
  config, workdir = trained
  directory = shards.run_sampling(config(), workdir)
  assert re.fullmatch(
    re.escape(workdir) + r"/samples_step2_ancestral_20steps_seed1_[0-9a-f]{8}", directory
  )
  assert shard_files(directory) == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
  written = [read_shard(os.path.join(directory, f)) for f in shard_files(directory)]
  assert [s[0].shape for s in written] == [(4, 8, 8, 1), (4, 8, 8, 1), (2, 8, 8, 1)]
  assert all(s[0].dtype == np.uint8 and s[1].dtype == np.int64 for s in written)
  np.testing.assert_array_equal(np.concatenate([s[1] for s in written]), np.arange(NUM_SAMPLES))
  images = shards.load_samples(directory)
  assert images.shape == (NUM_SAMPLES, 8, 8, 1) and images.dtype == np.uint8
  assert len({im.tobytes() for im in images}) == NUM_SAMPLES  # Every sample has its own noise.
  grid = np.asarray(Image.open(os.path.join(directory, "grid.png")))
  assert grid.shape == image_grid.make_grid(images)[..., 0].shape

  before = mtimes(directory)
  assert shards.run_sampling(config(), workdir) == directory
  assert mtimes(directory) == before
  np.testing.assert_array_equal(shards.load_samples(directory), images)

  path = os.path.join(directory, "shard_00001.npz")
  with open(path, "rb") as f:
    original = f.read()
  os.remove(path)
  with pytest.raises(FileNotFoundError, match="incomplete"):
    shards.load_samples(directory)
  shards.run_sampling(config(), workdir)
  with open(path, "rb") as f:
    assert f.read() == original
  after = mtimes(directory)
  assert {f: t for f, t in after.items() if f != "shard_00001.npz"} == {
    f: t for f, t in before.items() if f != "shard_00001.npz"
  }


def test_other_settings_never_reuse_stale_samples(trained):
  """Another beta schedule or image size (same checkpoint) samples anew into its own directory;
  it used to return the old shards ("0 of 3 shards to do")."""
  config, workdir = trained
  base = shards.run_sampling(config(), workdir)
  cosine = shards.run_sampling(config(**{"diffusion.beta_schedule": "cosine"}), workdir)
  larger = shards.run_sampling(
    config(**{"data.image_size": 16, "model.attn_resolutions": (8,)}), workdir
  )
  assert len({base, cosine, larger}) == 3
  assert shards.load_samples(larger).shape == (NUM_SAMPLES, 16, 16, 1)
  assert np.mean(shards.load_samples(cosine) != shards.load_samples(base)) > 0.1
  with open(os.path.join(cosine, shards.MANIFEST_NAME)) as f:
    manifest = json.load(f)
  assert manifest["diffusion"]["beta_schedule"] == "cosine"
  assert manifest["checkpoint_step"] == 2 and manifest["image_shape"] == [8, 8, 1]
  assert manifest["sampler"] == {
    "sampler": "ancestral",
    "num_steps": 20,
    "eta": 1.0,
    "clip_denoised": True,
    "order": 2,
    "spacing": "linspace",
    "karras": False,
    "lower_order_final": True,
  }
  # Neither the batch size nor the number of samples changes the images: same directory.
  assert shards.run_sampling(config(**{"sample.batch_size": 3}), workdir) == base
  # A directory whose manifest says otherwise is refused, and left as it is.
  with pytest.raises(shards.StaleSamplesError, match="holds samples of other settings"):
    shards.run_sampling(config(**{"diffusion.beta_schedule": "cosine"}), workdir, output_dir=base)
  manifest = shards.sample_manifest(
    config(), samplers.SamplerSpec.from_config(config().sample, 20), 2
  )
  with open(os.path.join(base, shards.MANIFEST_NAME)) as f:
    assert json.load(f) == json.loads(json.dumps(manifest)) and manifest["model"]["ch"] == 32


@pytest.mark.parametrize(
  "damage", ["empty", "truncated", "wrong_shape", "wrong_dtype", "wrong_indices"]
)
def test_bad_shards_are_regenerated(trained, damage):
  config, workdir = trained
  directory = shards.run_sampling(config(), workdir)
  path = os.path.join(directory, "shard_00001.npz")
  with open(path, "rb") as f:
    original = f.read()
  images, indices = read_shard(path)
  bad = {
    "empty": lambda: b"",
    "truncated": lambda: original[: len(original) // 2],
    "wrong_shape": lambda: shards._npz_bytes(images=images[:, :4], indices=indices),
    "wrong_dtype": lambda: shards._npz_bytes(images=images.astype(np.float32), indices=indices),
    "wrong_indices": lambda: shards._npz_bytes(images=images, indices=indices + 1),
  }[damage]()
  with open(path, "wb") as f:
    f.write(bad)
  before = mtimes(directory)
  shards.run_sampling(config(), workdir)
  with open(path, "rb") as f:
    assert f.read() == original
  after = mtimes(directory)
  assert {f for f in after if after[f] != before.get(f)} == {"shard_00001.npz"}


SAMPLERS = {
  "ancestral": {},
  "dpm_solver": {"sample.sampler": "dpm_solver", "sample.num_steps": 6, "sample.order": 3},
  "heun": {"sample.sampler": "heun", "sample.num_steps": 4, "sample.karras_sigmas": True},
}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_samples_do_not_depend_on_device_count_or_batch_size(trained, sampler):
  config, workdir = trained
  directory = shards.run_sampling(config(**SAMPLERS[sampler]), workdir)  # Batches of 4, 4 devices.
  written = shards.load_samples(directory)
  before = mtimes(directory)
  assert shards.run_sampling(config(**SAMPLERS[sampler]), workdir) == directory
  assert mtimes(directory) == before  # Complete: nothing sampled again.
  cfg = config(**SAMPLERS[sampler])
  bundle = model_bundle.ModelBundle.from_config(cfg)
  params, step = bundle.load_ema_params(workdir)
  assert step == 2
  spec = samplers.SamplerSpec.from_config(cfg.sample, bundle.diffusion.num_timesteps)
  rng = jax.random.PRNGKey(cfg.sample.seed)

  def draw(mesh, batch_size, start, count):
    fn = samplers.make_sample_fn(bundle.diffusion, bundle.model, mesh, (8, 8, 1), spec, batch_size)
    on_mesh = jax.device_put(jax.device_get(params), parallel.replicated(mesh))
    return fn(on_mesh, samplers.sample_keys(rng, start, count))

  four = parallel.make_mesh()
  assert four.devices.size == 4
  batch8 = np.concatenate([draw(four, 8, 0, 8), draw(four, 8, 8, 2)])
  one_device = draw(parallel.make_mesh(jax.devices()[:1]), 7, 3, 7)
  np.testing.assert_allclose(one_device, batch8[3:10], atol=1e-5)
  assert_close_uint8(image_grid.to_uint8(batch8), written)


def test_ddim_and_strided_ancestral_samplers(trained):
  config, workdir = trained
  ddim = shards.run_sampling(
    config(**{"sample.sampler": "ddim", "sample.num_steps": 5, "sample.eta": 0.0}), workdir
  )
  assert re.fullmatch(r"samples_step2_ddim_5steps_eta0_seed1_[0-9a-f]{8}", os.path.basename(ddim))
  dpm = config(**{"sample.sampler": "dpm_solver", "sample.num_steps": 5, "sample.order": 3})
  heun = config(**{"sample.sampler": "heun", "sample.num_steps": 5, "sample.spacing": "trailing"})
  for cfg, name in ((dpm, "dpm_solver3_linspace_5steps_nfe5"), (heun, "heun_trailing_5steps_nfe9")):
    directory = shards.run_sampling(cfg, workdir)
    assert re.fullmatch(rf"samples_step2_{name}_seed1_[0-9a-f]{{8}}", os.path.basename(directory))
    with open(os.path.join(directory, shards.MANIFEST_NAME)) as f:
      assert json.load(f)["sampler"]["sampler"] == cfg.sample.sampler
  # Ancestral with fewer steps than T is DDIM with eta = 1 on the same 5 strided steps.
  strided_config = config(**{"sample.num_steps": 5, "sample.eta": 0.0})
  assert samplers.SamplerSpec.from_config(strided_config.sample, 20) == samplers.SamplerSpec(
    "ancestral", 5, 1.0, True
  )
  strided = shards.run_sampling(strided_config, workdir)
  assert re.fullmatch(
    r"samples_step2_ancestral_5steps_seed1_[0-9a-f]{8}", os.path.basename(strided)
  )
  eta0, eta1 = shards.load_samples(ddim), shards.load_samples(strided)
  full = shards.load_samples(shards.run_sampling(config(), workdir))
  assert eta0.shape == eta1.shape == (NUM_SAMPLES, 8, 8, 1) and eta0.dtype == np.uint8
  assert np.mean(eta0 != eta1) > 0.1  # eta = 1 adds noise at every step; eta = 0 none.
  assert np.mean(eta0 != full) > 0.1 and np.mean(eta1 != full) > 0.1


def test_sampler_config_errors():
  cfg = tiny_digits_config(**{"sample.sampler": "ddim", "sample.num_steps": 21})
  with pytest.raises(ConfigError, match=r"sample.num_steps=21 .*T=20"):
    validate_config(cfg, mode="sample")
  assert samplers.SamplerSpec.from_config(tiny_digits_config().sample, 20).num_steps == 20


def test_no_checkpoint_error(tmp_path, trained):
  config, workdir = trained
  empty = str(tmp_path / "empty")
  with pytest.raises(readers.NoCheckpointError, match="Train first") as info:
    shards.run_sampling(config(), empty)
  assert os.path.join(empty, "checkpoints") in str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert not os.path.exists(os.path.join(empty, "checkpoints"))
  with pytest.raises(readers.NoCheckpointError, match=r"step 7 .*available steps: \[2\]"):
    shards.run_sampling(config(**{"sample.checkpoint_step": 7}), workdir)


# -- Figures. ----------------------------------------------------------------------------------


def untile(path, rows, cols, size=8, padding=2):
  image = np.asarray(Image.open(path))
  assert image.shape == (rows * (size + padding) + padding, cols * (size + padding) + padding)
  cell = lambda r, c: image[padding + r * (size + padding) :][
    :size, padding + c * (size + padding) :
  ][:, :size]
  return np.stack([[cell(r, c) for c in range(cols)] for r in range(rows)])[..., None]


def test_write_figures(trained):
  config, workdir = trained
  cfg = config()
  sources = figures.eval_images(cfg, 4)
  paths = figures.write_figures(cfg, workdir, num_pairs=2, num_samples=4, num_chains=3)
  assert set(paths) == {
    "progressive_generation",
    "shared_latents",
    "interpolation",
    "coarse_to_fine",
    "samplers",
  }
  assert all(p.startswith(os.path.join(workdir, "figures", "step_2")) for p in paths.values())
  progressive = untile(paths["progressive_generation"], 4, 21)  # 20 snapshots + the sample.
  assert_close_uint8(progressive[:, -2], progressive[:, -1])  # x0 predicted at t = 0 is the sample.
  assert np.mean(progressive[:, 0] != progressive[:, -1]) > 0.1
  assert_close_uint8(progressive[:, -1], shards.load_samples(shards.run_sampling(cfg, workdir), 4))
  shared = untile(paths["shared_latents"], 4, 2 + 3)
  source = image_grid.to_uint8(sources[0])
  assert all(np.array_equal(shared[r, 0], source) for r in range(4))
  assert len({shared[0, c].tobytes() for c in (2, 3, 4)}) == 3  # Chains differ.
  interp = untile(paths["interpolation"], 2, 13)
  np.testing.assert_array_equal(interp[:, 0], image_grid.to_uint8(sources[0::2]))
  np.testing.assert_array_equal(interp[:, -1], image_grid.to_uint8(sources[1::2]))
  coarse = untile(paths["coarse_to_fine"], 5, 13)
  np.testing.assert_array_equal(coarse[:, 0], np.repeat(interp[:1, 0], 5, axis=0))
  # Beyond the paper: samplers side by side from the same x_T; row 0 is Algorithm 2 (T = 20),
  # row 1 DDIM with eta 0 at 19 steps (T - 1), as --mode=sample draws them.
  specs = figures.comparison_specs(20, 20)
  assert [(s.sampler, s.nfe) for s in specs] == [
    ("ancestral", 20),
    ("ddim", 19),
    ("dpm_solver", 19),
    ("dpm_solver", 19),
    ("heun", 19),
  ]
  rows = untile(paths["samplers"], len(specs), 4)
  assert_close_uint8(rows[0], progressive[:, -1])
  ddim = cfg.copy_and_resolve_references()
  ddim.sample.sampler, ddim.sample.num_steps, ddim.sample.eta = "ddim", 19, 0.0
  assert_close_uint8(rows[1], shards.load_samples(shards.run_sampling(ddim, workdir), 4))
  assert np.mean(rows[2] != rows[0]) > 0.1  # The ODE's samples are not the stochastic chain's.


def test_interpolation_endpoints_are_reconstructions(trained):
  config, workdir = trained
  cfg = config()
  diffusion, model = model_bundle.create_diffusion(cfg), model_bundle.create_model(cfg)
  params, _ = model_bundle.ModelBundle.from_config(cfg).load_ema_params(workdir)
  params = jax.device_get(params)
  images = figures.eval_images(cfg, 3)
  rng, t = jax.random.PRNGKey(5), figures.scaled_timestep(0.5, 20)
  assert t == 9
  ab = figures.interpolation(diffusion, model, params, images[:1], images[1:2], rng, timesteps=[t])
  ac = figures.interpolation(diffusion, model, params, images[:1], images[2:3], rng, timesteps=[t])
  assert ab.shape == (1, 13, 8, 8, 1) and ab.dtype == np.uint8
  np.testing.assert_array_equal(ab[0, 1], ac[0, 1])  # lambda = 0 does not see image b.
  assert not np.array_equal(ab[0, -2], ac[0, -2])  # lambda = 1 is image b's reconstruction.
  lam0, lam_half, lam1 = ab[0, 1], ab[0, 6], ab[0, 11]
  assert len({lam0.tobytes(), lam_half.tobytes(), lam1.tobytes()}) == 3
  # The reconstruction of a, with the key split of `diffusion.interpolate` (one key per row).
  noise_rng, loop_rng = jax.random.split(jax.random.fold_in(rng, 0))
  rng_a = jax.random.split(noise_rng)[0]

  @jax.jit
  def reconstruct(params, x):
    model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
    x_t = diffusion.q_sample(x, np.full((1,), t, np.int32), jax.random.normal(rng_a, x.shape[1:]))
    return diffusion.p_sample_loop_from(model_fn, x_t, t, loop_rng[None])

  assert_close_uint8(image_grid.to_uint8(reconstruct(params, images[:1]))[0], lam0)


# -- Class conditioning and classifier-free guidance. ------------------------------------------


@pytest.fixture(scope="module")
def conditional():
  """A tiny class-conditional digits model (3 classes) with random weights, replicated."""
  cfg = tiny_digits_config(**{"model.num_classes": 3, "model.dropout": 0.0})
  bundle = model_bundle.ModelBundle.from_config(cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype),
    model_bundle.abstract_params(cfg),
  )
  return cfg, bundle, jax.device_put(params, parallel.replicated(bundle.mesh))


def test_guidance_is_one_batched_forward_of_the_two_predictions(conditional):
  cfg, bundle, params = conditional
  d, model = bundle.diffusion, bundle.model
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  t = jnp.array([3, 7, 11, 19], jnp.int32)
  y = jnp.array([0, 1, 2, 1], jnp.int32)
  calls = []

  def apply(x, t, y):
    calls.append(x.shape[0])
    return model.apply({"params": params}, x, t, y=y)

  guided = samplers.guided_model_fn(apply, d, y, 3, 2.5)(x, t)
  assert calls == [8]  # One forward pass of 2B.
  eps_c, eps_u = apply(x, t, y), apply(x, t, jnp.full((4,), 3, jnp.int32))
  np.testing.assert_allclose(guided, 3.5 * eps_c - 2.5 * eps_u, atol=2e-5)
  assert float(jnp.max(jnp.abs(guided - eps_c))) > 1e-2
  # Scale 0 is the conditional model itself: one forward of B, the same values.
  calls.clear()
  np.testing.assert_array_equal(samplers.guided_model_fn(apply, d, y, 3, 0.0)(x, t), eps_c)
  assert calls == [4]


@pytest.mark.parametrize("sampler", ["ancestral", "dpm_solver"])
def test_guided_sampling_with_scale_0_is_the_conditional_sampler(conditional, sampler):
  cfg, bundle, params = conditional
  spec = samplers.SamplerSpec(sampler, 20 if sampler == "ancestral" else 8)
  keys = samplers.sample_keys(jax.random.PRNGKey(1), 0, 6)
  labels = samplers.sample_labels(cfg.sample, 3, 0, 6)
  np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])  # Balanced, by sample index.

  def draw(scale):
    fn = samplers.make_sample_fn(
      bundle.diffusion, bundle.model, bundle.mesh, (8, 8, 1), spec, 8, guidance_scale=scale
    )
    return fn(params, keys, labels)

  chain = samplers.make_chain_fn(bundle.diffusion, spec)
  model_fn = lambda x, t: bundle.model.apply({"params": params}, x, t, y=jnp.asarray(labels))
  direct = jax.jit(lambda k: chain(model_fn, (6, 8, 8, 1), k))(keys)
  np.testing.assert_allclose(draw(0.0), direct, atol=1e-5)
  assert np.abs(draw(3.0) - direct).max() > 5e-3  # Guidance moves the samples (>> 1e-5).


def test_conditional_sample_mode_writes_labels_into_its_shards(conditional, tmp_path):
  cfg, bundle, params = conditional
  from ddpm_jax import convert

  workdir = str(tmp_path / "imported")
  convert.save_checkpoint(jax.device_get(params), cfg, workdir, step=0)
  cfg.sample.num_samples, cfg.sample.batch_size, cfg.sample.num_steps = 7, 4, 20
  cfg.sample.guidance_scale = 1.5
  directory = shards.run_sampling(cfg, workdir)
  labels = shards.load_labels(directory, 7)
  np.testing.assert_array_equal(labels, np.arange(7) % 3)
  with open(os.path.join(directory, shards.MANIFEST_NAME)) as f:
    manifest = json.load(f)
  assert manifest["guidance_scale"] == 1.5 and manifest["class_label"] == -1
  before = mtimes(directory)
  assert shards.run_sampling(cfg, workdir) == directory and mtimes(directory) == before
  # A fixed label is another directory; a shard whose labels are wrong is sampled again.
  cfg.sample.class_label = 2
  fixed = shards.run_sampling(cfg, workdir)
  assert fixed != directory
  np.testing.assert_array_equal(shards.load_labels(fixed, 7), np.full(7, 2))
  path = os.path.join(fixed, "shard_00001.npz")
  images, indices = read_shard(path)
  with open(path, "wb") as f:
    f.write(shards._npz_bytes(images=images, indices=indices, labels=np.zeros(3, np.int32)))
  shards.run_sampling(cfg, workdir)
  np.testing.assert_array_equal(shards.load_labels(fixed, 7), np.full(7, 2))
