"""Every config field of ddpm_jax, with the CIFAR-10 values of the paper.

The dataset configs in the repository's configs/ build on `get_config` and change only what
differs. Any field can be overridden on the command line, e.g. `--config.training.batch_size=8`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.data = data = ml_collections.ConfigDict()
  # cifar10 | celeb_a_hq | lsun_church | lsun_bedroom | lsun_cat | digits | folder
  data.dataset = "cifar10"
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.data_dir = ""  # TFDS data dir ("" = TFDS default), or the folder / TFRecord pattern.
  data.source = "tfds"  # For LSUN: tfds | tfrecords. Ignored elsewhere.
  data.shuffle_buffer = 10_000
  # Disjoint shards of the train split, each read by one process (0: one per process). Fix it
  # to keep the exact data stream when resuming with another process count that divides it.
  data.num_shards = 0
  data.eval_split = "test"

  config.model = model = ml_collections.ConfigDict()
  model.ch = 128
  model.out_ch = 0  # 0: num_channels, doubled for learned variance.
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resamp_with_conv = True
  model.dtype = "float32"  # Compute dtype: float32 | bfloat16.
  model.param_dtype = "float32"
  model.remat = False  # Recompute blocks' activations in the backward pass (less memory).
  # How 3x3 convolutions run: xla | xla_matmul_grad | shifted_matmul (models/convolution.py).
  model.conv_impl = "xla"
  # > 0: class-conditional (a learned class embedding, plus the null class of classifier-free
  # guidance); the data must have as many labels. 0: unconditional, the paper's models.
  model.num_classes = 0

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.beta_schedule = "linear"
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.num_timesteps = 1000
  diffusion.model_mean_type = "eps"
  diffusion.model_var_type = "fixedlarge"
  diffusion.loss_type = "mse"

  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 2e-4
  optim.warmup_steps = 5000
  optim.grad_clip = 1.0
  optim.ema_decay = 0.9999
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global, over all devices of all processes.
  training.num_train_steps = 800_000
  training.steps_per_call = 1
  training.checkpoint_every_steps = 10_000
  training.checkpoint_every_secs = 1800
  training.keep_checkpoints = 3
  training.sample_every = 50_000
  training.num_sample_images = 64
  training.log_every = 100
  # At the end of training: FID (and IS) of this many EMA samples against the real data (0: off).
  training.fid_num_samples = 0
  # Class-conditional models: each example's label becomes the null class with this probability.
  training.label_dropout = 0.1
  training.seed = 0

  config.sample = sample = ml_collections.ConfigDict()
  sample.num_samples = 50_000
  sample.batch_size = 256
  # ancestral (the paper's, Algorithm 2) | ddim | dpm_solver (DPM-Solver++) | heun (EDM).
  sample.sampler = "ancestral"
  sample.num_steps = 1000  # Network evaluations: heun's are 2 * num_steps - 1.
  sample.eta = 1.0  # ddim: the noise of each step (0: deterministic).
  sample.order = 2  # dpm_solver: 1 (DDIM with eta 0), 2 or 3.
  sample.spacing = "linspace"  # dpm_solver, heun: the times as diffusers spaces them (or trailing).
  sample.karras_sigmas = False  # dpm_solver, heun: Karras et al.'s noise levels instead.
  sample.lower_order_final = True  # dpm_solver: lower orders in the last steps (< 15 steps).
  sample.clip_denoised = True
  # Class-conditional models: w of classifier-free guidance,
  # eps = (1 + w) eps(x, y) - w eps(x, null) (0: the conditional model alone), and the label of
  # every sample (-1: sample i gets i mod num_classes, balanced over the classes).
  sample.guidance_scale = 0.0
  sample.class_label = -1
  sample.checkpoint_step = -1  # -1: latest.
  sample.seed = 1

  config.eval = eval_config = ml_collections.ConfigDict()
  eval_config.batch_size = 256
  eval_config.num_examples = -1  # -1: the whole split.
  eval_config.inception_weights = ""  # The .npz made by ddpm_jax.weights.convert_inception.
  eval_config.fid_split = "train"  # The paper's CIFAR-10 FID is against the training set.
  eval_config.fid_stats_dir = ""  # Cache of reference statistics ("": ~/.cache/ddpm_jax).
  eval_config.bpd = True  # --mode=eval: bits/dim of the eval split and the rate-distortion table.
  eval_config.sample_quality = True  # --mode=eval: FID/IS of sample.num_samples samples.
  eval_config.watch = False  # --mode=eval: evaluate each checkpoint as training writes it.
  eval_config.watch_poll_secs = 60.0

  return config


def get_256_config() -> ml_collections.ConfigDict:
  """The paper's 256x256 models (CelebA-HQ, LSUN): 114M params, eps / L_simple / fixedsmall,
  lr 2e-5, batch 64. The dataset configs set the data and the training length."""
  config = get_config()
  config.data.image_size = 256
  config.data.shuffle_buffer = 2_000
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.diffusion.model_var_type = "fixedsmall"
  config.optim.lr = 2e-5
  config.training.batch_size = 64
  config.training.sample_every = 20_000
  config.training.num_sample_images = 16
  config.sample.batch_size = 64
  config.eval.batch_size = 64
  return config


def get_digits_config() -> ml_collections.ConfigDict:
  """The embedded digits (scikit-learn's 1,797 real 8x8 digits, no download): a 1M-parameter
  U-Net at their native 8x8, T = 1000, about 10 minutes of training on 2 CPU cores. The
  repository's configs/digits.py and configs/digits_conditional.py build on it."""
  config = get_config()
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
