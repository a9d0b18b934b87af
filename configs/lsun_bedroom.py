"""LSUN bedroom 256x256 (114M params; FID 6.36), 2.4M steps, no random flip (as in the paper).

The paper's large bedroom model (FID 4.90, about 256M params) is `--config.model.ch=192`.

  python -m ddpm_jax.main --config=configs/lsun_bedroom.py --workdir=/tmp/ddpm_bedroom \
      --config.data.source=tfrecords --config.data.data_dir='/data/lsun/bedroom-r08.tfrecords'
"""

from ddpm_jax.config import defaults


def get_config():
  config = defaults.get_256_config()  # The paper's 256x256 settings.
  config.data.dataset = "lsun_bedroom"
  config.data.eval_split = "validation"
  config.data.random_flip = False
  config.training.num_train_steps = 2_400_000
  return config
