"""CelebA-HQ 256x256 (114M params), eps / L_simple / fixedsmall, lr 2e-5, batch 64.

Needs the manually prepared TFDS `celeb_a_hq/256` (see the README).

  python -m ddpm_jax.main --config=configs/celeb_a_hq.py --workdir=/tmp/ddpm_celeb_a_hq
"""

from ddpm_jax.config import defaults


def get_config():
  config = defaults.get_256_config()  # The paper's 256x256 settings.
  config.data.dataset = "celeb_a_hq"
  config.data.eval_split = "train"  # TFDS celeb_a_hq has only a train split.
  config.training.num_train_steps = 500_000
  return config
