#!/usr/bin/env bash
# Shared helpers for the launch/*.sh scripts (sourced, never run). Nothing to edit here.
#
# Every check runs BEFORE the deepspeed launcher starts, so a typo in a path costs a one-line
# error on the submitting shell instead of N processes failing on N nodes.

# The repository root (this file lives in <root>/launch).
SPOXL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SPOXL_ROOT

die() {
  echo "launch: error: $*" >&2
  exit 2
}

# from_caller PATH: PATH made absolute when it exists relative to the caller's directory, so a
# relative path works from wherever the script is started; otherwise PATH unchanged (the scripts
# then cd to the repository root, where the defaults like configs/... are relative to).
from_caller() {
  if [[ "$1" != /* && -e "$1" ]]; then
    printf '%s\n' "$PWD/$1"
  else
    printf '%s\n' "$1"
  fi
}

# require_file WHAT PATH: PATH must be a readable file.
require_file() {
  [[ -n "$2" ]] || die "$1 is not set (edit the settings block of the script or export it)"
  [[ -f "$2" && -r "$2" ]] || die "$1 '$2' does not exist or is not readable"
}

# require_int WHAT VALUE: a whole number.
require_int() {
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"
}

# use_python_env DIR: DIR/bin must hold python and deepspeed, and spoxl must import.
# Sets PYTHON and DEEPSPEED to the env's executables (the launcher starts every rank with its own
# interpreter, so nothing depends on PATH order) and appends DIR/bin to PATH, so that tools the
# env brings (ninja, which DeepSpeed's JIT op builds call) are found when the system has none.
# Appended, not prepended: processes that disagree on which ninja builds a shared
# TORCH_EXTENSIONS_DIR make each other rebuild every op (ninja versions keep incompatible logs).
use_python_env() {
  local env_dir="$1"
  [[ -n "$env_dir" ]] || die "PYTHON_ENV is not set (the virtualenv/conda env that has spoxl installed)"
  [[ -x "$env_dir/bin/python" ]] || die "PYTHON_ENV '$env_dir' has no bin/python (create it: make venv)"
  [[ -x "$env_dir/bin/deepspeed" ]] || die "PYTHON_ENV '$env_dir' has no bin/deepspeed (pip install deepspeed)"
  # find_spec, not import: importing deepspeed costs seconds and logs accelerator warnings.
  "$env_dir/bin/python" -c "import importlib.util as u, sys
sys.exit(not (u.find_spec('spoxl') and u.find_spec('deepspeed')))" 2>/dev/null \
    || die "PYTHON_ENV '$env_dir' cannot import spoxl and deepspeed (pip install -e . in that env)"
  PATH="$PATH:$env_dir/bin"
  export PATH
  # shellcheck disable=SC2034  # read by the scripts that source this file
  PYTHON="$env_dir/bin/python"
  # shellcheck disable=SC2034
  DEEPSPEED="$env_dir/bin/deepspeed"
}

# run_or_print CMD...: run CMD, or only print it (shell-quoted) when SPOXL_DRY_RUN=1.
run_or_print() {
  if [[ "${SPOXL_DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}
