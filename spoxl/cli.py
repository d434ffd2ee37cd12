"""The `spoxl` command: one dispatcher, each subcommand living beside the code it drives.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their subcommand runs, so `spoxl --help` stays fast and nothing imports triton/deepspeed
unless it is needed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from spoxl.errors import SpoxlError

# name -> (module, one-line help)
COMMANDS = {
    "sample": ("spoxl.commands.sample", "sample an image grid from an SDXL model (or the tiny one)"),
    "make-tiny": ("spoxl.commands.make_tiny", "save the tiny random SDXL model as a diffusers folder"),
    "train": ("spoxl.commands.train", "launch training through the deepspeed launcher"),
    "export": ("spoxl.commands.export", "export a checkpoint as LoRA safetensors / diffusers UNet"),
    "preflight": ("spoxl.commands.preflight", "check a hostfile + config against the cluster before launch"),
    "eval": ("spoxl.commands.eval", "base vs tuned models on the same prompts and seeds, scored, with paired figures"),
    "toy": ("spoxl.commands.toy", "the toy world: pretrain / export the toy model, make preference pairs"),
    "pairs": ("spoxl.commands.pairs", "preference-pair set tools: NCP's absolute-winners subset"),
    "train-preference-model": ("spoxl.commands.train_preference_model",
                               "train the step-aware preference model (SPM) on preference pairs"),
}


def build_parser(available=None) -> argparse.ArgumentParser:
    from spoxl import __version__

    parser = argparse.ArgumentParser(prog="spoxl", description="Preference fine-tuning of SDXL at cluster scale.")
    parser.add_argument("--version", action="version", version=f"spoxl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if available is not None and name not in available:
            continue
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] == "--version":
            parser.parse_args(argv[:1])  # prints "spoxl X.Y.Z" and exits 0
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    _quiet_libraries()
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"spoxl {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except BrokenPipeError:  # `spoxl toy captions | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SpoxlError as e:
        print(f"spoxl {name}: error: {e}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """transformers and diffusers log warnings that are noise for spoxl's users (e.g. a missing
    torchvision for CLIP image processors spoxl never uses) and that would bury one-line errors.
    Errors still show; set TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY=warning to see them all."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for module in ("transformers", "diffusers"):  # already imported (in process, e.g. tests): set it there too
        lib = sys.modules.get(module)
        if lib is not None:
            levels = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
            lib.utils.logging.set_verbosity(levels.get(os.environ[module.upper() + "_VERBOSITY"].lower(), 40))


if __name__ == "__main__":
    sys.exit(main())
