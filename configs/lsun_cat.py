"""LSUN cat 256x256 (114M params; FID 19.75), 1.8M steps.

  python -m ddpm_jax.main --config=configs/lsun_cat.py --workdir=/tmp/ddpm_cat \
      --config.data.source=tfrecords --config.data.data_dir='/data/lsun/cat-r08.tfrecords'
"""

from ddpm_jax.config import defaults


def get_config():
  config = defaults.get_256_config()  # The paper's 256x256 settings.
  config.data.dataset = "lsun_cat"
  config.data.eval_split = "train"  # LSUN object categories have no validation split.
  config.training.num_train_steps = 1_800_000
  return config
