"""Sampling: `samplers` (the reverse chains, sharded over the devices), `shards` (`--mode=sample`:
many samples as resumable .npz shards) and `figures` (`--mode=figures`: the paper's Figs. 6-9)."""
