"""Training, used by `--mode=train` alone: `state` (TrainState, optimizer, EMA), `step` (the
per-device step and its shard_map), `program` (model bundle, optimizer, jitted step), `loop`
(resume, log, sample, checkpoint) and `preemption` (SIGTERM)."""
