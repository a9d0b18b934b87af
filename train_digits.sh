#!/usr/bin/env bash
# Sets up .venv if needed, then trains and samples the embedded digits (no download, about
# 10 minutes on 2 CPU cores). Rerunning resumes. Usage: ./train_digits.sh [WORKDIR] [--config.x=y]
# WORKDIR defaults to workdir_digits in the repository; a relative WORKDIR is taken from the
# directory the command runs in.
set -euo pipefail
WORKDIR=workdir_digits
# shellcheck source=scripts/workdir_arg.sh
source "$(dirname "$0")/scripts/workdir_arg.sh"
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
exec "$PY" -m ddpm_jax.main --config=configs/digits.py --workdir="$WORKDIR" "$@"
