"""Every config field with the CIFAR-10 values of the paper (`ddpm_jax/config/defaults.py`).

python -m ddpm_jax.main --config=configs/default.py --workdir=/tmp/ddpm_cifar10
"""

from ddpm_jax.config.defaults import get_config

__all__ = ["get_config"]
