"""Where spoxl's own files are, and checks, before any work starts, that an output path can be
created: one line naming the problem instead of an OSError (or a traceback) after minutes of
sampling or training."""

from __future__ import annotations

import os
from pathlib import Path

from spoxl.errors import SpoxlError

# The pretrained toy-world model shipped in the package (a diffusers SDXL folder; spoxl.toy.model).
TOY_WEIGHTS_DIR = Path(__file__).parent / "toy" / "weights"
# The toy world's latent reward model (LPO), trained by `spoxl train-preference-model --kind lrm`.
TOY_LRM_DIR = Path(__file__).parent / "toy" / "lrm"


def toy_lrm_path() -> Path:
    """The shipped toy LRM folder, or a one-line error saying how to make it."""
    if not (TOY_LRM_DIR / "lrm_head.safetensors").is_file():
        raise SpoxlError(f"the toy latent reward model is missing from {TOY_LRM_DIR} (reinstall spoxl, or rebuild it "
                         f"with `spoxl toy lrm --out {TOY_LRM_DIR}`)")
    return TOY_LRM_DIR


def toy_model_path() -> Path:
    """The shipped pretrained toy model folder, or a one-line error saying how to make it."""
    if not (TOY_WEIGHTS_DIR / "model_index.json").is_file():
        raise SpoxlError(f"the pretrained toy model is missing from {TOY_WEIGHTS_DIR} "
                         f"(reinstall spoxl, or rebuild it with `spoxl toy pretrain --out {TOY_WEIGHTS_DIR}`)")
    return TOY_WEIGHTS_DIR


def check_can_create(path, what: str) -> Path:
    """`path` (a folder or a file) can be made: no ancestor is a regular file, no component is
    longer than the filesystem allows or holds a NUL byte, and the nearest existing folder is
    writable. Returns the path."""
    path = Path(path).expanduser()
    if "\0" in str(path):
        raise SpoxlError(f"{what} {str(path)!r} contains a NUL byte")
    for part in path.parts:
        if len(part.encode()) > 255:
            raise SpoxlError(f"{what} has a path component longer than 255 bytes: {part[:40]}...")
    existing = path.parent if not path.exists() else path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir() and existing != path:
        raise SpoxlError(f"{what} {path} cannot be created: {existing} is a file")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpoxlError(f"{what} {path} cannot be created: no write access to {folder}")
    return path
