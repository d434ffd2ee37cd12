#!/usr/bin/env bash
# Train on ONE machine with N GPUs:   bash launch/single_node.sh [--set section.key=value ...]
# Extra arguments are passed to `spoxl.train` (e.g. --set train.max_steps=10, --resume).
set -euo pipefail

# ---- EDIT THIS BLOCK (or export the variables) ---------------------------------------------------
PYTHON_ENV="${PYTHON_ENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}"  # env with spoxl + deepspeed
CONFIG="${CONFIG:-configs/spo_sdxl.yaml}"        # training recipe (YAML)
NUM_GPUS="${NUM_GPUS:-8}"                         # ranks on this machine
MASTER_PORT="${MASTER_PORT:-29500}"               # any free TCP port (two jobs on one box: differ)
# ---- end of the block ----------------------------------------------------------------------------

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
CONFIG="$(from_caller "$CONFIG")"
cd "$SPOXL_ROOT"
use_python_env "$PYTHON_ENV"
require_file CONFIG "$CONFIG"
require_int NUM_GPUS "$NUM_GPUS"
require_int MASTER_PORT "$MASTER_PORT"
export PYTHONUNBUFFERED=1

run_or_print "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" \
  --module spoxl.train --config "$CONFIG" "$@"
