#!/usr/bin/env bash
# Sourced by train_digits.sh and train_digits_conditional.sh, before they cd, with WORKDIR set to
# their default and the caller's arguments: a first argument that is not a --flag is the work
# directory, taken from the directory the command runs in unless it is absolute or a URL, and is
# shifted off the caller's arguments.
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  WORKDIR="$1"
  shift
  case "$WORKDIR" in
    /* | *://*) ;;
    *) WORKDIR="$PWD/$WORKDIR" ;;
  esac
fi
