"""Configs: `defaults` (every field, with the paper's CIFAR-10 values; the repository's configs/
build on it) and `validation` (the checks each mode runs before compiling)."""
