"""LSUN church_outdoor 256x256 (114M params; FID 7.89), 1.2M steps in the paper.

From StyleGAN TFRecords (the paper's route):
  python -m ddpm_jax.main --config=configs/lsun_church.py --workdir=/tmp/ddpm_church \
      --config.data.source=tfrecords --config.data.data_dir='/data/lsun/church-r08.tfrecords'
or from TFDS `lsun/church_outdoor`:
  python -m ddpm_jax.main --config=configs/lsun_church.py --workdir=/tmp/ddpm_church
"""

from ddpm_jax.config import defaults


def get_config():
  config = defaults.get_256_config()  # The paper's 256x256 settings.
  config.data.dataset = "lsun_church"
  config.data.eval_split = "validation"
  config.training.num_train_steps = 1_200_000
  return config
