"""Checkpoints: DeepSpeed's own save/load plus what exact resume needs, with a crash-safe `latest`.

Layout of <checkpoint dir>:
  step_00000010/          engine.save_checkpoint(tag="step_00000010") (model, optimizer, scheduler)
    spoxl_rank{r}.pt      per-rank state we own: global step, objective position, RNG states
                          (torch, numpy, python, the per-rank generator); DeepSpeed's client_state
                          is written by rank 0 only under ZeRO-1/2, so it cannot hold per-rank RNG
    spoxl_complete        written by rank 0 after EVERY rank finished writing (after a barrier)
  latest_spoxl            the tag of the newest COMPLETE checkpoint, replaced atomically (os.replace)
  latest                  DeepSpeed's own pointer, the same tag, written the same way at the same moment,
                          so DeepSpeed's tools (the zero_to_fp32.py copied into every checkpoint,
                          load_checkpoint without a tag) work without --tag

A SIGKILL during a save leaves a tag folder without `spoxl_complete` and `latest_spoxl` still
naming the previous checkpoint; the partial folder is ignored and deleted by the next save.
DeepSpeed's own `latest` is not written by save_checkpoint (save_latest=False) because DeepSpeed
would update it before the other ranks finish; spoxl writes it after the checkpoint is complete.

Universal checkpoints (resume on a different number of ranks): `to_universal(dir)` runs
DeepSpeed's ds_to_universal on the latest tag into <tag>_universal; resuming with
`checkpoint.load_universal=true` loads that folder.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from spoxl.errors import SpoxlError

LATEST = "latest_spoxl"
DEEPSPEED_LATEST = "latest"
COMPLETE = "spoxl_complete"
ABORTED_PREFIX = "aborted_"  # aborted_step_N: the state at a NaN abort, kept for inspection only
UNIVERSAL_SUFFIX = "_universal"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# RNG state (all generators a step may draw from)


def rng_state(generator: torch.Generator | None) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # numpy's state as plain tensors/ints so torch.load(weights_only=True) reads it back.
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_list(random.getstate()),
        "generator": generator.get_state() if generator is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _python_state_to_list(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete step tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def latest_tag(ckpt_dir) -> str | None:
    """The tag `latest_spoxl` names, if that checkpoint is complete (else the newest complete one)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new tag, never half


def _point_latest(ckpt_dir: Path, tag: str) -> None:
    """spoxl's pointer and DeepSpeed's `latest`, both atomically, spoxl's first (it is the one resume reads)."""
    _write_atomic(ckpt_dir / LATEST, tag)
    _write_atomic(ckpt_dir / DEEPSPEED_LATEST, tag)


# ---------------------------------------------------------------------------------------------
# Save / load


def save(trainer, objective, ckpt_dir, keep_last: int, *, tag: str | None = None, publish: bool = True) -> str:
    """Collective: every rank must call it at the same step.

    publish=False (with its own `tag`, e.g. aborted_step_N) writes a complete checkpoint that is not
    a resume point: `latest` keeps naming the previous one, nothing is pruned."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or tag_for(trainer.global_step)
    if trainer.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt_dir / tag
        if stale.exists():  # an older save of this very step (e.g. from a killed run)
            if latest_tag(ckpt_dir) == tag:
                # Never let `latest` name a folder being rewritten: point it at the previous one.
                older = [t for t in complete_tags(ckpt_dir) if t < tag]
                if older:
                    _point_latest(ckpt_dir, older[-1])
                else:
                    (ckpt_dir / LATEST).unlink(missing_ok=True)
                    (ckpt_dir / DEEPSPEED_LATEST).unlink(missing_ok=True)
            shutil.rmtree(stale)
    _barrier()
    client_state = {"global_step": trainer.global_step, "config": trainer.config.to_dict()}
    try:
        trainer.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=trainer.lora)
        own = {
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "objective": objective.state_dict(),
            "rng": rng_state(trainer.generator),
            "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
            "model_shape": _model_shape(trainer.config),
        }
        _save_file(own, ckpt_dir / tag / f"spoxl_rank{trainer.rank}.pt")
    except (OSError, RuntimeError) as e:
        # A full disk or a vanished mount: torch.save raises OSError or RuntimeError("... failed
        # writing file ..."). The folder never gets its completion marker, so `latest` still names
        # the previous checkpoint; say so in one line instead of a traceback.
        if isinstance(e, RuntimeError) and "writ" not in str(e).lower():
            raise
        detail = " ".join(str(e).split())[:200]
        previous = latest_tag(ckpt_dir)
        raise SpoxlError(f"checkpoint {ckpt_dir / tag} could not be written ({detail}); the newest whole "
                         f"checkpoint is still {previous or 'none'}") from None
    _barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if trainer.rank == 0:
        (ckpt_dir / tag / COMPLETE).write_text(str(trainer.global_step))
        if publish:
            _point_latest(ckpt_dir, tag)
            _prune(ckpt_dir, keep_last, tag)
    _barrier()
    if publish:
        trainer.last_checkpoint_step = trainer.global_step
    return tag


def _save_file(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _prune(ckpt_dir: Path, keep_last: int, just_saved: str) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and partial leftovers.

    Never the one just saved (and named by `latest_spoxl`), even when higher step numbers from
    another run share the folder: losing it would make a resume fall back to that other run.
    """
    tags = complete_tags(ckpt_dir)
    keep = set(tags[-keep_last:]) | {just_saved}
    for p in ckpt_dir.iterdir():
        if _TAG.match(p.name) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(ckpt_dir / (p.name + UNIVERSAL_SUFFIX), ignore_errors=True)


def _model_shape(cfg) -> dict:
    """The recipe values that decide which tensors a checkpoint holds; a resume must match them."""
    shape = {"lora.enabled": cfg.lora.enabled, "model.path": cfg.model.path}
    if cfg.lora.enabled:
        shape.update({"lora.rank": cfg.lora.rank, "lora.target_modules": list(cfg.lora.target_modules)})
    return shape


def _check_model_shape(trainer, ckpt_dir: Path, tag: str) -> None:
    """A one-line error instead of DeepSpeed's key/shape mismatch traceback."""
    saved = torch.load(ckpt_dir / tag / "spoxl_rank0.pt", map_location="cpu", weights_only=True).get("model_shape")
    if not saved:
        return
    for key, now in _model_shape(trainer.config).items():
        if key in saved and saved[key] != now:
            raise SpoxlError(f"checkpoint {ckpt_dir / tag} was trained with {key}={saved[key]!r} but the recipe "
                             f"says {now!r}; resume with the same recipe (or a fresh checkpoint.dir)")


def damaged_file(tag_dir: Path) -> str | None:
    """A line naming the first unreadable file of a checkpoint folder, or None when all look whole.

    torch.save writes zip archives whose directory is at the END of the file, so a truncated file
    (a full disk, a copy cut short) fails to open as a zip: a cheap check that reads no tensors.
    """
    import zipfile

    for f in sorted(tag_dir.rglob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{f} is damaged ({'truncated or not a checkpoint file' if isinstance(e, zipfile.BadZipFile) else e})"
    return None


def _resumable_tag(trainer, ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint whose files are all readable; each damaged newer one is
    named in a warning and skipped. Collective: every rank checks, and all agree."""
    from spoxl.engine.zero_utils import first_error_on_any_rank

    newest = latest_tag(ckpt_dir)
    candidates = [t for t in reversed(complete_tags(ckpt_dir)) if newest is None or t <= newest]
    for i, tag in enumerate(candidates):
        problem = first_error_on_any_rank(damaged_file(ckpt_dir / tag))
        if problem is None:
            return tag
        fallback = candidates[i + 1] if i + 1 < len(candidates) else None
        _warn(trainer, f"checkpoint {ckpt_dir / tag} cannot be resumed: {problem}; "
                   + (f"falling back to {fallback}" if fallback else "no older complete checkpoint"))
    if candidates:
        raise SpoxlError(f"no checkpoint in {ckpt_dir} can be resumed (every complete one has a damaged file)")
    return None


def load(trainer, objective, ckpt_dir, universal: bool = False) -> str | None:
    """Resume from the latest complete, undamaged checkpoint (None when there is none). Collective."""
    ckpt_dir = Path(ckpt_dir)
    tag = _resumable_tag(trainer, ckpt_dir) if not universal else latest_tag(ckpt_dir)
    if tag is None:
        return None
    _check_model_shape(trainer, ckpt_dir, tag)
    load_tag = tag + UNIVERSAL_SUFFIX if universal else tag
    if universal and not (ckpt_dir / load_tag).is_dir():
        raise SpoxlError(f"no universal checkpoint {ckpt_dir / load_tag}; convert first: "
                         f"python -m spoxl.engine.checkpoint to-universal {ckpt_dir}")
    path, _ = trainer.engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_module_strict=not trainer.lora,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise SpoxlError(f"DeepSpeed could not load checkpoint {ckpt_dir / load_tag}")
    own_file = ckpt_dir / tag / f"spoxl_rank{trainer.rank}.pt"
    if not own_file.is_file():
        # A universal resume on more ranks than were saved: this rank has no state of its own;
        # rank 0's step counter (and EMA) apply.
        own_file = ckpt_dir / tag / "spoxl_rank0.pt"
    own = torch.load(own_file, map_location="cpu", weights_only=True)
    trainer.global_step = int(own["global_step"])
    trainer.last_checkpoint_step = trainer.global_step
    saved_world = own.get("world_size")
    if saved_world == trainer.world_size:
        objective.load_state_dict(own["objective"])
        set_rng_state(own["rng"], trainer.generator)
    else:
        # The data position and RNG streams were per rank: they cannot be split or merged over a
        # different rank count, so they restart. Say so: the run is no longer an exact resume.
        _warn(trainer, f"checkpoint {ckpt_dir / tag} was saved on {saved_world} rank(s), resuming on {trainer.world_size}: "
                   f"weights, optimizer and LR schedule continue from step {trainer.global_step}, but the data "
                   f"position ({type(objective).__name__} state) and the RNG streams restart from the beginning")
    if trainer.ema is not None and own.get("ema") is not None:
        trainer.ema.load_state_dict(own["ema"])
    return tag


def _warn(trainer, message: str) -> None:
    """One warning line from rank 0 (train.log and stderr through the run's logger)."""
    logger = getattr(trainer, "logger", None)
    if logger is not None:
        logger.warning(message)
    elif trainer.rank == 0:
        print(f"[spoxl] warning: {message}", file=sys.stderr, flush=True)


def to_universal(ckpt_dir, tag: str | None = None) -> Path:
    """Convert a checkpoint (default: the latest complete one) with DeepSpeed's ds_to_universal."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise SpoxlError(f"no complete checkpoint in {ckpt_dir}")
    src, out = ckpt_dir / tag, ckpt_dir / (tag + UNIVERSAL_SUFFIX)
    if out.exists():
        shutil.rmtree(out)
    # --inject_missing_state: non-Megatron models lack universal_checkpoint_info (DeepSpeed asks for it).
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SpoxlError(f"ds_to_universal failed on {src}: {last}")
    return out


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m spoxl.engine.checkpoint")
    sub = parser.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("to-universal", help="convert the latest checkpoint to DeepSpeed's universal format")
    u.add_argument("checkpoint_dir")
    u.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    try:
        out = to_universal(args.checkpoint_dir, args.tag)
    except SpoxlError as e:
        print(f"spoxl checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
