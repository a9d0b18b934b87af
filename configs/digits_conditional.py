"""The embedded digits, class-conditional: the digits config with a class embedding, label
dropout 0.1 and classifier-free guidance (Ho & Salimans 2022), w = 1 when sampling, with
DPM-Solver++ (order 2, 20 steps: 40 network evaluations per batch with guidance).

  ./train_digits_conditional.sh   # trains, then FID and class accuracy over guidance scales
  python -m ddpm_jax.main --config=configs/digits_conditional.py --workdir=/tmp/ddpm_digits_c
"""

from ddpm_jax.config import defaults


def get_config():
  config = defaults.get_digits_config()
  config.model.num_classes = 10  # The digits 0-9; label 10 is the null class.
  config.training.label_dropout = 0.1
  config.sample.guidance_scale = 1.0
  config.sample.sampler = "dpm_solver"
  config.sample.num_steps = 20
  config.sample.order = 2
  return config
