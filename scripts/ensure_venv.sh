#!/usr/bin/env bash
# Sourced by run_tests.sh and train_digits.sh: creates .venv (once) with ddpm_jax installed
# from setup.py, reinstalling when setup.py changes. Needs only python3. Sets $PY.
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
PY="$VENV/bin/python"
