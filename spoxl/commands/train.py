"""`spoxl train`: a thin wrapper that checks the config, then execs the deepspeed launcher:

    spoxl train --config configs/tiny_sft.yaml --num-gpus 2 [--set a.b=c] [--resume]
 == deepspeed --num_gpus 2 --master_port P --module spoxl.train --config ... [--set ...] [--resume]

Everything else (hostfiles, --no_ssh, include/exclude) is the deepspeed launcher's: pass extra
launcher flags after `--launcher-args`, or call `deepspeed` directly.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--num-gpus", type=int, default=None,
                        help="ranks on this machine (GPUs; on CPU, processes); default: all GPUs, 1 on CPU")
    parser.add_argument("--hostfile", default=None, help="MPI-style hostfile for multi-node runs")
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    parser.add_argument("--launcher-args", default="", help="extra deepspeed launcher flags as one string, e.g. --launcher-args=\"--no_ssh_check\"")
    parser.add_argument("--dry-run", action="store_true", help="print the deepspeed command and exit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(args) -> list[str]:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed)] if deepspeed.exists() else [shutil.which("deepspeed") or "deepspeed"]
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile]
    if args.num_gpus is not None:
        cmd += ["--num_gpus", str(args.num_gpus)]
    elif not args.hostfile and _no_gpu():
        cmd += ["--num_gpus", "1"]
    cmd += ["--master_port", str(args.master_port or _free_port())]
    cmd += shlex.split(args.launcher_args)
    cmd += ["--module", "spoxl.train", "--config", args.config]
    for o in args.overrides:
        cmd += ["--set", o]
    if args.resume:
        cmd += ["--resume"]
    return cmd


def _no_gpu() -> bool:
    import torch

    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def run(args) -> int:
    from spoxl.train import check_recipe

    # One-line errors before any rank starts. The world size is known for a local run only;
    # with a hostfile the ranks re-check at their real world size.
    if args.hostfile:  # a malformed hostfile would otherwise surface as the launcher's traceback
        from spoxl.cluster.hostfile import parse_hostfile

        parse_hostfile(args.hostfile)
    world = args.num_gpus if (args.num_gpus and not args.hostfile) else (1 if _no_gpu() and not args.hostfile else None)
    check_recipe(args.config, args.overrides, world)
    cmd = launcher_command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    env = dict(os.environ)
    # The C++ op DeepSpeed JIT-builds on first init is cached in the venv (built once, not per run).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    if _no_gpu():
        env["DS_ACCELERATOR"] = "cpu"
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached
