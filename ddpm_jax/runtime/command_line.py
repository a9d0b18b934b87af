"""What the two command lines (`ddpm_jax.main`, `ddpm_jax.convert`) share: absl flag parsing that
turns a bad flag, config file or config override into one line, and quieter library logs."""

from __future__ import annotations

import logging
import os
import sys

import ml_collections
from absl import flags
from absl import logging as absl_logging


class _QuietOrbax(logging.Filter):
  """Drops Orbax's per-save INFO lines; its warnings and errors still show, without tracebacks
  (a failed save ends in our own one-line error)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.WARNING


def quiet_library_logs() -> None:
  """Installs the Orbax log filter on absl's handler (call once the program runs)."""
  absl_logging.get_absl_handler().addFilter(_QuietOrbax())


def _config_load_error(error: Exception, argv: list[str]) -> str:
  """One line for a --config file that cannot be loaded or an override naming no field."""
  config_arg = next((a for a in argv if a.startswith("--config=")), "--config=")
  path = config_arg.partition("=")[2].split(":")[0]
  if path and not os.path.isfile(path):
    return f"{config_arg}: no such file."
  if isinstance(error, (AttributeError, KeyError)):
    name = str(error).strip("'\"")
    bad = [
      a.partition("=")[0]
      for a in argv
      if a.startswith("--config.") and name in a.partition("=")[0].split(".")
    ]
    if bad:
      return (
        f"{bad[0]}: no such config field ({name!r}); configs/default.py lists every field "
        "and its default."
      )
  if isinstance(error, AttributeError) and not isinstance(
    flags.FLAGS["config"].value, ml_collections.ConfigDict
  ):
    return f"{config_arg}: its get_config() must return an ml_collections.ConfigDict."
  first_line = (str(error).strip().splitlines() or [""])[0]
  return f"{config_arg} could not be loaded: {type(error).__name__}: {first_line}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`) for programs with a
  `--config` flag: a bad flag, config file or config override ends in one line, exit status 2."""
  try:
    rest = flags.FLAGS(argv)
    flags.FLAGS.config.to_dict()  # A config file that failed to load raises here.
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    print(
      f"error: {' '.join(lines[:1] + lines[1:][-1:])}\nPass --helpshort to see the flags.",
      file=sys.stderr,
    )
    sys.exit(2)
  except (OSError, AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
    print(f"error: {_config_load_error(e, argv)}", file=sys.stderr)
    sys.exit(2)
  return rest
