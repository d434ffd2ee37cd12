"""Derive the deepspeed launcher's arguments from a SLURM job's environment.

launch/slurm.sbatch runs ONE task per node (srun --ntasks-per-node=1); each task runs

    eval "$(python -m spoxl.cluster.slurm --hostfile "$HOSTFILE")"

which writes a DeepSpeed hostfile for the allocation and prints shell `export` lines:

    MASTER_ADDR   first node of SLURM_JOB_NODELIST (the rank-0 launcher runs there)
    MASTER_PORT   $MASTER_PORT if set, else 29500 + SLURM_JOB_ID % 1000 (two jobs sharing a node
                  must not both bind 29500)
    NODE_RANK     SLURM_NODEID (this node's index in the allocation, = its line in the hostfile)
    NNODES        SLURM_NNODES (checked against the expanded nodelist)
    GPUS_PER_NODE SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("8" or "a100:8"), else the
                  length of SLURM_JOB_GPUS / CUDA_VISIBLE_DEVICES
    WORLD_SIZE    NNODES * GPUS_PER_NODE

and the node's launcher then starts with `--no_ssh --node_rank "$NODE_RANK"`. The nodelist is
expanded here (no `scontrol show hostnames`, which compute nodes of some sites lack).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from spoxl.errors import SpoxlError

DEFAULT_PORT_BASE = 29500


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1-2],b' -> ['a[1-2]', 'b']."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SpoxlError(f"SLURM nodelist {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise SpoxlError(f"SLURM nodelist {text!r}: unbalanced '['")
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str, whole: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as SLURM does)."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise SpoxlError(f"SLURM nodelist {whole!r}: bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise SpoxlError(f"SLURM nodelist {whole!r}: range {item!r} runs backwards")
        width = len(lo)
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM hostlist syntax -> hostnames in allocation order.

    'gpu[01-04]' -> gpu01..gpu04; 'a[1-2],b7' -> a1, a2, b7; 'r[1-2]n[1-2]' -> r1n1, r1n2, r2n1, r2n2.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices = [_expand_range_list(p[1:-1], nodelist) if p.startswith("[") else [p] for p in pieces if p]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    if not hosts:
        raise SpoxlError(f"SLURM nodelist {nodelist!r} names no hosts")
    return hosts


def _require(env: dict, *names: str) -> str:
    for name in names:
        if env.get(name, "").strip():
            return env[name].strip()
    raise SpoxlError(f"{' / '.join(names)} is not set: run this inside a SLURM allocation (sbatch/srun)")


def _int(value: str, name: str) -> int:
    if not value.isdigit():
        raise SpoxlError(f"{name}={value!r} is not a whole number")
    return int(value)


def gpus_per_node(env: dict) -> int:
    """GPUs this node's launcher should start ranks on."""
    if env.get("SLURM_GPUS_ON_NODE", "").strip():
        return _int(env["SLURM_GPUS_ON_NODE"].strip(), "SLURM_GPUS_ON_NODE")
    per_node = env.get("SLURM_GPUS_PER_NODE", "").strip()
    if per_node:
        # "8", "a100:8" or "gpu:a100:8" (--gpus-per-node=[type:]N)
        return _int(per_node.split(":")[-1].split("(")[0], "SLURM_GPUS_PER_NODE")
    for name in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        devices = env.get(name, "").strip()
        if devices:
            return len([d for d in devices.split(",") if d.strip()])
    raise SpoxlError("cannot tell the GPUs per node: none of SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, "
                     "SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES is set (request GPUs with --gpus-per-node)")


@dataclass(frozen=True)
class SlurmLaunch:
    hosts: list[str]
    master_addr: str
    master_port: int
    node_rank: int
    nnodes: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node

    def hostfile_text(self) -> str:
        return "".join(f"{h} slots={self.gpus_per_node}\n" for h in self.hosts)

    def exports(self) -> dict[str, str]:
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "NODE_RANK": str(self.node_rank),
            "NNODES": str(self.nnodes),
            "GPUS_PER_NODE": str(self.gpus_per_node),
            "WORLD_SIZE": str(self.world_size),
        }


def derive(env: dict | None = None) -> SlurmLaunch:
    """The launch parameters of this node, from a SLURM job's environment (default os.environ)."""
    env = dict(os.environ if env is None else env)
    hosts = expand_nodelist(_require(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    nnodes = _int(_require(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES"), "SLURM_NNODES")
    if nnodes != len(hosts):
        raise SpoxlError(f"SLURM_NNODES={nnodes} but the nodelist names {len(hosts)} hosts")
    node_rank = _int(_require(env, "SLURM_NODEID"), "SLURM_NODEID")
    if node_rank >= nnodes:
        raise SpoxlError(f"SLURM_NODEID={node_rank} is outside the {nnodes}-node allocation")
    if env.get("MASTER_PORT", "").strip():
        port = _int(env["MASTER_PORT"].strip(), "MASTER_PORT")
    else:
        port = DEFAULT_PORT_BASE + _int(env.get("SLURM_JOB_ID", "0").strip() or "0", "SLURM_JOB_ID") % 1000
    master = env.get("MASTER_ADDR", "").strip() or hosts[0]
    return SlurmLaunch(hosts, master, port, node_rank, nnodes, gpus_per_node(env))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spoxl.cluster.slurm",
        description="Print `export` lines (MASTER_ADDR, MASTER_PORT, NODE_RANK, NNODES, GPUS_PER_NODE, "
                    "WORLD_SIZE) for this node of a SLURM job; optionally write the DeepSpeed hostfile.")
    parser.add_argument("--hostfile", default=None, help="write the allocation's DeepSpeed hostfile here")
    args = parser.parse_args(argv)
    try:
        launch = derive()
        if args.hostfile:
            Path(args.hostfile).parent.mkdir(parents=True, exist_ok=True)
            Path(args.hostfile).write_text(launch.hostfile_text())
    except (SpoxlError, OSError) as e:
        print(f"spoxl slurm: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for key, value in launch.exports().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
