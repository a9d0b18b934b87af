#!/usr/bin/env bash
# Sets up .venv if needed, then trains and samples the embedded digits (no download, about
# 10 minutes on 2 CPU cores). Rerunning resumes. Usage: ./train_digits.sh [WORKDIR] [--config.x=y]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
WORKDIR="${1:-workdir_digits}"
shift || true
exec "$PY" -m ddpm_jax.main --config=configs/digits.py --workdir="$WORKDIR" "$@"
