"""Weights in: the original TF1 checkpoints (`tf1`) and diffusers' UNet2DModel (`diffusers`),
read from files of the internet without running their code (`files`, `torch_pickle`), matched to
a config's U-Net (`matching`) and written as a run's checkpoint (`importer`); pytorch-fid's
Inception weights for FID (`convert_inception`). `python -m ddpm_jax.convert` is the command."""
