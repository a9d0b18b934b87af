"""CIFAR-10 32x32, class-conditional: the paper's model with a class embedding, label dropout 0.1
and classifier-free guidance (Ho & Salimans 2022), w = 0.3 when sampling.

  python -m ddpm_jax.main --config=configs/cifar10_conditional.py --workdir=/tmp/ddpm_cifar10_c
"""

from ddpm_jax.config import defaults


def get_config():
  config = defaults.get_config()
  config.data.shuffle_buffer = 50_000  # A full shuffle of the 50k training images each epoch.
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.sample.guidance_scale = 0.3
  return config
