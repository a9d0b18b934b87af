#!/usr/bin/env bash
# Sets up .venv if needed, then runs ruff (lint, and the formatter's check) and the test suite with
# pytest on 2 workers.
# Extra arguments go to pytest, e.g. ./run_tests.sh -q -k diffusion
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
"$PY" -m ruff check ddpm_jax configs tests launch notebooks benchmarks
"$PY" -m ruff format --check ddpm_jax configs tests launch notebooks benchmarks
# Whole files per worker, in the order tests/conftest.py gives them (the slowest first).
exec "$PY" -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@" tests
