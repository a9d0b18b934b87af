"""Dataset code of ddpm_jax: the embedded digits builder and readers for non-TFDS formats.

Importing this package registers the `ddpm_digits` TFDS builder.
"""

from ddpm_jax.datasets import image_folder, lsun_tfrecords
from ddpm_jax.datasets.digits import DdpmDigits

__all__ = ["DdpmDigits", "image_folder", "lsun_tfrecords"]
