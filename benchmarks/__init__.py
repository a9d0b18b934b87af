"""Benchmarks of ddpm_jax and its PyTorch peer (`benchmarks.peer`)."""
