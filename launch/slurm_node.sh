#!/usr/bin/env bash
# One SLURM task per node runs this (launch/slurm.sbatch starts it with srun): derive this node's
# launch parameters from the SLURM environment, write the allocation's hostfile to node-local
# storage, and start this node's deepspeed launcher through launch/per_node.sh. Nothing to edit:
# the settings live in launch/slurm.sbatch.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
cd "$SPOXL_ROOT"
use_python_env "${PYTHON_ENV:-$SPOXL_ROOT/.venv}"

HOSTFILE="${TMPDIR:-/tmp}/spoxl-hostfile-${SLURM_JOB_ID:-nojob}"
exports="$("$PYTHON" -m spoxl.cluster.slurm --hostfile "$HOSTFILE")" || exit 2
eval "$exports"  # MASTER_ADDR MASTER_PORT NODE_RANK NNODES GPUS_PER_NODE WORLD_SIZE
export HOSTFILE
echo "spoxl slurm: node $NODE_RANK/$NNODES ($(hostname)), $GPUS_PER_NODE GPUs, world size $WORLD_SIZE," \
  "master $MASTER_ADDR:$MASTER_PORT" >&2
exec bash "$SPOXL_ROOT/launch/per_node.sh" "$@"
