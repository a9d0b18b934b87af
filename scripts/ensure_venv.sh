#!/usr/bin/env bash
# Sourced by run_tests.sh and train_digits.sh: creates .venv (once) with ddpm_jax installed
# from setup.py with the extras in $DDPM_JAX_EXTRAS (default cpu,test), reinstalling when
# setup.py changes or the extras differ. Needs only python3. Sets $PY.
VENV="${DDPM_JAX_VENV:-.venv}"
EXTRAS="${DDPM_JAX_EXTRAS:-cpu,test}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.ddpm_jax-installed"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ] || [ "$(cat "$STAMP")" != "$EXTRAS" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
  echo "$EXTRAS" > "$STAMP"
fi
PY="$VENV/bin/python"
