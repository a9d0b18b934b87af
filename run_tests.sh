#!/usr/bin/env bash
# Creates (once) the virtual environment .venv with ddpm_jax and its test extra, then runs the
# test suite with pytest on all cores. Needs only python3. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${DDPM_JAX_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.ddpm_jax-installed"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[cpu,test]"
  touch "$STAMP"
fi
"$VENV/bin/python" -m ruff check ddpm_jax configs tests
exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" tests
