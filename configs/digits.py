"""The embedded default: the 1,797 real 8x8 digits that scikit-learn ships (no download).

A 1M-parameter U-Net at the digits' native 8x8, T = 1000, about 10 minutes on 2 CPU cores
(`ddpm_jax.config.defaults.get_digits_config` holds its settings):
  python -m ddpm_jax.main --config=configs/digits.py --workdir=/tmp/ddpm_digits
"""

from ddpm_jax.config import defaults


def get_config():
  return defaults.get_digits_config()
