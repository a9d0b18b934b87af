"""The mode-neutral model bundle, and the direction of the dependencies: sampling and the converter
stand on it without training's optimizer or TensorFlow's input pipeline."""

import json
import subprocess
import sys

import jax
import numpy as np
from conftest import REPO, subprocess_env, tiny_digits_config

from ddpm_jax import model_bundle, parallel

IMPORTS_OF = """
import json, sys
for name in sys.argv[1:]:
  __import__(name)
print(json.dumps({m: m in sys.modules for m in ("tensorflow", "optax", "clu")}))
"""

SAMPLE_AN_IMPORTED_CHECKPOINT = """
import json, sys
from configs import digits
from ddpm_jax.sampling import shards
config = digits.get_config()
for key, value in json.loads(sys.argv[2]).items():
  section, name = key.split(".")
  config[section][name] = value
directory = shards.run_sampling(config, sys.argv[1])
print(json.dumps({"images": shards.load_samples(directory).shape,
                  "modules": {m: m in sys.modules for m in ("tensorflow", "optax", "clu")}}))
"""

TINY = {
  "model.ch_mult": [1, 2],
  "model.num_res_blocks": 1,
  "model.attn_resolutions": [4],
  "diffusion.num_timesteps": 5,
  "sample.num_samples": 4,
  "sample.batch_size": 4,
}


def fresh_python(code: str, *args: str) -> dict:
  result = subprocess.run(
    [sys.executable, "-c", code, *args],
    env=subprocess_env(1),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_sampling_and_the_converter_import_neither_tensorflow_nor_optax():
  modules = fresh_python(
    IMPORTS_OF,
    "ddpm_jax.sampling.shards",
    "ddpm_jax.convert",
    "ddpm_jax.main",
    "ddpm_jax.model_bundle",
  )
  assert modules == {"tensorflow": False, "optax": False, "clu": False}
  # Training does import them: the test above can fail.
  assert fresh_python(IMPORTS_OF, "ddpm_jax.training.loop") == {
    "tensorflow": True,
    "optax": True,
    "clu": True,
  }


def test_sample_mode_on_an_imported_checkpoint_builds_no_optimizer(tmp_path):
  """A converted checkpoint holds a full train state, optimizer moments included; sampling reads
  its EMA params alone, in a process that never imports optax (nor TensorFlow)."""
  from ddpm_jax import convert

  config = tiny_digits_config(**{"model.num_res_blocks": 1, "diffusion.num_timesteps": 5})
  params = jax.tree.map(
    lambda x: np.random.default_rng(0).normal(size=x.shape).astype(x.dtype) * 0.05,
    model_bundle.abstract_params(config),
  )
  workdir = str(tmp_path / "imported")
  convert.save_checkpoint(params, config, workdir, step=0)
  out = fresh_python(SAMPLE_AN_IMPORTED_CHECKPOINT, workdir, json.dumps(TINY))
  assert out["images"] == [4, 8, 8, 1]
  assert out["modules"] == {"tensorflow": False, "optax": False, "clu": False}


def test_bundle_restores_the_ema_params_of_an_imported_checkpoint(tmp_path):
  from ddpm_jax import convert

  config = tiny_digits_config(**{"model.num_res_blocks": 1})
  abstract = model_bundle.abstract_params(config)
  params = jax.tree.map(lambda x: np.full(x.shape, 0.25, x.dtype), abstract)
  convert.save_checkpoint(params, config, str(tmp_path), step=7)
  bundle = model_bundle.ModelBundle.from_config(config)
  restored, step = bundle.load_ema_params(str(tmp_path))
  assert step == 7
  assert jax.tree.structure(restored) == jax.tree.structure(abstract)
  leaves = jax.tree.leaves(restored)
  assert all(np.all(np.asarray(x) == 0.25) for x in leaves)
  assert all(x.sharding == parallel.replicated(bundle.mesh) for x in leaves)
  assert bundle.image_shape == (8, 8, 1) and bundle.diffusion.num_timesteps == 20
