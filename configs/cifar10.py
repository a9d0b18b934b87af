"""CIFAR-10 32x32, the paper's L_simple model (35.7M params; FID 3.17, IS 9.46).

python -m ddpm_jax.main --config=configs/cifar10.py --workdir=/tmp/ddpm_cifar10
"""

from ddpm_jax.config import defaults


def get_config():
  config = defaults.get_config()
  config.data.shuffle_buffer = 50_000  # A full shuffle of the 50k training images each epoch.
  return config
