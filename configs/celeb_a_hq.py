"""CelebA-HQ 256x256 (114M params), eps / L_simple / fixedsmall, lr 2e-5, batch 64.

Needs the manually prepared TFDS `celeb_a_hq/256` (see the README).

  python -m ddpm_jax.main --config=configs/celeb_a_hq.py --workdir=/tmp/ddpm_celeb_a_hq
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "celeb_a_hq"
  config.data.image_size = 256
  config.data.eval_split = "train"  # TFDS celeb_a_hq has only a train split.
  config.data.shuffle_buffer = 2_000
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.diffusion.model_var_type = "fixedsmall"
  config.optim.lr = 2e-5
  config.training.batch_size = 64
  config.training.num_train_steps = 500_000
  config.training.sample_every = 20_000
  config.training.num_sample_images = 16
  config.sample.batch_size = 64
  config.eval.batch_size = 64
  return config
