"""Checkpoints: `checkpointer` saves and restores the train state (Orbax: atomic, asynchronous,
checksummed); `readers` give sampling and evaluation read-only access to a run's EMA params."""
