"""What both sides of the benchmarks share: config loading and the one-JSON-line protocol."""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import ml_collections


def load_config(name: str) -> ml_collections.ConfigDict:
  """'digits' (or 'configs/digits.py') -> `configs.digits.get_config()`."""
  name = os.path.splitext(os.path.basename(name))[0]
  return importlib.import_module(f"configs.{name}").get_config()


def print_result(run: Callable[[], dict[str, Any]]) -> None:
  """Runs one workload with its stdout sent to stderr, then prints its result dict as the one
  JSON line on stdout (`benchmarks.run` reads the last line); a non-finite value is an error."""
  with contextlib.redirect_stdout(sys.stderr):
    result = run()
  if not math.isfinite(result["value"]):
    raise SystemExit(f"Non-finite result: {result}")
  print(json.dumps(result), flush=True)
