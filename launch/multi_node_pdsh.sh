#!/usr/bin/env bash
# Train on several machines from ONE shell, through a DeepSpeed hostfile + pdsh (passwordless ssh
# from this machine to every host, the same paths everywhere: a shared filesystem).
#   bash launch/multi_node_pdsh.sh [--set section.key=value ...]
# Extra arguments are passed to `spoxl.train`. Check the hostfile and recipe first:
#   spoxl preflight --hostfile "$HOSTFILE" --config "$CONFIG"
set -euo pipefail

# ---- EDIT THIS BLOCK (or export the variables) ---------------------------------------------------
PYTHON_ENV="${PYTHON_ENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}"  # same path on every node
CONFIG="${CONFIG:-configs/spo_sdxl_4node.yaml}"  # training recipe (YAML)
HOSTFILE="${HOSTFILE:-launch/hostfile}"           # lines of 'HOST slots=GPUS', first host = rank 0
MASTER_ADDR="${MASTER_ADDR:-}"                    # address of the FIRST host, reachable from all nodes
MASTER_PORT="${MASTER_PORT:-29500}"               # free TCP port on the first host
# Network settings (interfaces, InfiniBand) are in launch/nccl_env.sh: edit them once per cluster.
# ---- end of the block ----------------------------------------------------------------------------

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
CONFIG="$(from_caller "$CONFIG")"
HOSTFILE="$(from_caller "$HOSTFILE")"
cd "$SPOXL_ROOT"
use_python_env "$PYTHON_ENV"
require_file CONFIG "$CONFIG"
require_file HOSTFILE "$HOSTFILE"
require_int MASTER_PORT "$MASTER_PORT"
[[ -n "$MASTER_ADDR" ]] || die "MASTER_ADDR is not set (the first host's address, e.g. its IB IP)"
command -v pdsh >/dev/null || die "pdsh is not installed on this machine (apt-get install pdsh)"
# Parse the hostfile with line-numbered errors before pdsh fans out.
"$PYTHON" -m spoxl.cluster.hostfile "$HOSTFILE" || exit 2
# shellcheck source=launch/nccl_env.sh
source "$SPOXL_ROOT/launch/nccl_env.sh"

# pdsh forwards only NCCL*/PYTHON*/UCX* variables; the rest go through a DeepSpeed env file.
DS_ENV_FILE="$(mktemp "${TMPDIR:-/tmp}/spoxl-ds-env.XXXXXX")"
export DS_ENV_FILE
trap 'rm -f "$DS_ENV_FILE"' EXIT
for var in "${SPOXL_NET_VARS[@]}" DS_ACCELERATOR SPOXL_WATCHDOG SPOXL_WATCHDOG_TIMEOUT_S SPOXL_WATCHDOG_INTERVAL_S; do
  if [[ -n "${!var:-}" ]]; then
    printf '%s=%s\n' "$var" "${!var}" >>"$DS_ENV_FILE"
  fi
done
if [[ "${SPOXL_DRY_RUN:-0}" == "1" ]]; then
  sed 's/^/DS_ENV_FILE: /' "$DS_ENV_FILE" >&2
fi

run_or_print "$DEEPSPEED" --hostfile "$HOSTFILE" --launcher pdsh \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module spoxl.train --config "$CONFIG" "$@"
