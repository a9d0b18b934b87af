#!/usr/bin/env bash
# Sets up .venv if needed, trains the class-conditional digits model (configs/digits_conditional.py,
# the digits' training budget), then samples it at guidance scales 0, 0.5, 1, 2, 4 and writes FID
# and class accuracy per scale to WORKDIR/guidance_sweep/{table.md,plot.png,results.json}.
# Rerunning resumes both. Usage: ./train_digits_conditional.sh [WORKDIR] [--config.x=y]
# (the overrides apply to both); SWEEP_FLAGS="--num_samples=N --seeds=1,2 --guidance_scales=0,1"
# changes the sweep's own flags.
# WORKDIR defaults to workdir_digits_conditional in the repository; a relative WORKDIR is taken
# from the directory the command runs in.
set -euo pipefail
WORKDIR=workdir_digits_conditional
# shellcheck source=scripts/workdir_arg.sh
source "$(dirname "$0")/scripts/workdir_arg.sh"
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
CONFIG=configs/digits_conditional.py
read -r -a SWEEP <<<"${SWEEP_FLAGS:-}"
"$PY" -m ddpm_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
exec "$PY" -m ddpm_jax.evaluation.sweeps --sweep=guidance --config="$CONFIG" \
  --workdir="$WORKDIR" "${SWEEP[@]}" "$@"
