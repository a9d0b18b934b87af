"""The embedded default: the 1,797 real 8x8 digits that scikit-learn ships (no download).

A 1M-parameter U-Net at the digits' native 8x8, T = 1000, about 10 minutes on 2 CPU cores:
  python -m ddpm_jax.main --config=configs/digits.py --workdir=/tmp/ddpm_digits
"""

from ddpm_jax.config import defaults


def get_config():
  config = defaults.get_config()
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.num_channels = 1
  config.data.random_flip = False  # Digits are not mirror-symmetric.
  config.data.shuffle_buffer = 2_000

  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.1

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995  # A short run: the paper's 0.9999 would average too far back.

  config.training.batch_size = 128
  config.training.num_train_steps = 2_000
  config.training.checkpoint_every_steps = 500
  config.training.checkpoint_every_secs = 300
  config.training.log_every = 100
  config.training.sample_every = 2_000
  config.training.num_sample_images = 100
  config.training.fid_num_samples = 500

  config.sample.batch_size = 500
  config.eval.batch_size = 297
  return config
