#!/usr/bin/env bash
# Train on several machines WITHOUT ssh: run this script once on EVERY node (by hand, from a
# scheduler, or from launch/slurm.sbatch), each with its own NODE_RANK. Every node needs the same
# hostfile; node NODE_RANK starts the ranks of line NODE_RANK of it.
#   NODE_RANK=0 bash launch/per_node.sh     # on the first host (MASTER_ADDR)
#   NODE_RANK=1 bash launch/per_node.sh     # on the second host, ...
# Extra arguments are passed to `spoxl.train`. If one node fails, the others end too (within
# spoxl's watchdog timeout), but a scheduler that starts the nodes should also kill the job's
# other nodes when one exits non-zero (SLURM: srun --kill-on-bad-exit=1).
set -euo pipefail

# ---- EDIT THIS BLOCK (or export the variables) ---------------------------------------------------
PYTHON_ENV="${PYTHON_ENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}"  # env with spoxl + deepspeed
CONFIG="${CONFIG:-configs/spo_sdxl_4node.yaml}"  # training recipe (YAML), same on every node
HOSTFILE="${HOSTFILE:-launch/hostfile}"           # lines of 'HOST slots=GPUS', same on every node
NODE_RANK="${NODE_RANK:-}"                        # 0 on the first host of the hostfile, 1, 2, ...
MASTER_ADDR="${MASTER_ADDR:-}"                    # address of the node with NODE_RANK=0
MASTER_PORT="${MASTER_PORT:-29500}"               # free TCP port on that node
LOG_DIR="${LOG_DIR:-}"                            # optional: one log file per rank in this folder
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
require_int NODE_RANK "$NODE_RANK"
require_int MASTER_PORT "$MASTER_PORT"
[[ -n "$MASTER_ADDR" ]] || die "MASTER_ADDR is not set (the address of the node with NODE_RANK=0)"
"$PYTHON" -m spoxl.cluster.hostfile "$HOSTFILE" >/dev/null || exit 2
# shellcheck source=launch/nccl_env.sh
source "$SPOXL_ROOT/launch/nccl_env.sh"

log_args=()
if [[ -n "$LOG_DIR" ]]; then
  mkdir -p "$LOG_DIR"
  log_args=(--enable_each_rank_log "$LOG_DIR")
fi

run_or_print "$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ${log_args[@]+"${log_args[@]}"} \
  --module spoxl.train --config "$CONFIG" "$@"
