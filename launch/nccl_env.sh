#!/usr/bin/env bash
# Network / NCCL settings for multi-node runs (sourced by the multi-node launch scripts).
# Edit the site-specific block ONCE per cluster. Every value can also be overridden from the
# environment (VAR=... bash launch/...), which is why each line reads `${VAR:-default}`.
#
# With the pdsh launcher, DeepSpeed forwards variables starting with NCCL (and PYTHON, UCX, ...) to
# the other nodes, but NOT the TORCH_* / GLOO_* ones: multi_node_pdsh.sh writes all of them into a
# DeepSpeed env file (DS_ENV_FILE) so every node sees the same settings.

# ---- site-specific: EDIT THIS BLOCK -------------------------------------------------------------
# Interface for NCCL's bootstrap/socket traffic and for gloo (torch's TCP rendezvous). "^lo,docker"
# means "anything but loopback and docker bridges"; on most clusters name the fast interface
# explicitly (ib0, bond0, enp…). A wrong interface is the classic cause of hangs at init.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
# gloo takes plain interface names only (no "^" exclusion): it follows NCCL's when that is a name.
if [[ -z "${GLOO_SOCKET_IFNAME:-}" && "$NCCL_SOCKET_IFNAME" != ^* ]]; then
  export GLOO_SOCKET_IFNAME="$NCCL_SOCKET_IFNAME"
fi
# InfiniBand HCAs used for GPU traffic. DGX A100: the 8 compute NICs are mlx5_0..3 and mlx5_6..9
# (mlx5_4/5 are storage): NCCL_IB_HCA="=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_6,mlx5_7,mlx5_8,mlx5_9".
# Left unset, NCCL uses every HCA it finds. `ibstat` lists them.
NCCL_IB_HCA="${NCCL_IB_HCA:-}"
if [[ -n "$NCCL_IB_HCA" ]]; then export NCCL_IB_HCA; else unset NCCL_IB_HCA; fi
# 0 = use InfiniBand/RoCE. Set 1 only on Ethernet-only clusters (NCCL then falls back to sockets).
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
# GPUDirect RDMA: let the NIC read GPU memory when GPU and NIC share a PCIe host bridge (PHB).
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
# ---- end of the site-specific block --------------------------------------------------------------

# WARN prints only problems; use INFO for the first run on a new cluster (it names the
# interfaces/HCAs NCCL picked) and INFO + NCCL_DEBUG_SUBSYS=INIT,NET to debug hangs at init.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# On a NCCL error or a collective timeout, abort the communicator and raise in the rank instead of
# hanging: the rank exits, the local launcher kills its siblings, and spoxl's watchdog
# (spoxl.cluster.watchdog) ends the ranks on the other nodes. 3 = tear the process down (torch's
# default since 2.2, set explicitly because some site images export 0 = hang until killed).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
# Dump NCCL's flight recorder (last collectives per rank) when a collective times out: tells which
# rank was behind.
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
# Unbuffered Python output: launcher logs of 32 ranks interleave line by line, not in 4 KiB blocks.
export PYTHONUNBUFFERED=1
# DeepSpeed JIT-compiles C++ ops on first use; keep the cache per environment (the default under
# ~/.cache is shared between environments and gets invalidated by another torch install).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${PYTHON_ENV:-$HOME}/torch_extensions}"
# Names of the variables above, for launchers that forward env to remote nodes.
# shellcheck disable=SC2034  # read by multi_node_pdsh.sh, which sources this file
SPOXL_NET_VARS=(NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_NET_GDR_LEVEL
  NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_NCCL_DUMP_ON_TIMEOUT
  PYTHONUNBUFFERED TORCH_EXTENSIONS_DIR)
