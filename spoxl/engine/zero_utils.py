"""Reading parameters that DeepSpeed ZeRO-3 may have partitioned, and small rank helpers.

API
  unwrap(model)                      -> the plain nn.Module (engine.module for a DeepSpeed engine)
  is_partitioned(param)              -> True for a ZeRO-3 parameter (it has a `ds_id`)
  gathered(params, modifier_rank)    -> context manager: full data visible on every rank inside it
                                        (deepspeed.zero.GatheredParameters; a no-op without ZeRO-3)
  gathered_state_dict(model, keep=, rank0_only=) -> {name: fp32 CPU tensor} of params + buffers,
                                        gathered chunk by chunk so peak extra memory stays bounded;
                                        trainable params of a bf16/fp16 engine are read from
                                        DeepSpeed's fp32 master copy, not the rounded module weights
  rank(), world_size(), is_rank0(), barrier()  -> work with or without torch.distributed
  raise_on_every_rank(error)         -> collective: if any rank has an error message, every rank
                                        raises SpoxlError with the first one (by rank)
  errors_on_every_rank()             -> context manager around work some ranks do alone (rank 0
                                        writing files): an exception inside it is re-raised as
                                        that one-line SpoxlError on EVERY rank, not just the one
                                        that failed (the others would wait in the next collective)

Why this exists: under ZeRO-3 a parameter above `stage3_param_persistence_threshold` holds an
empty tensor (numel 0) outside a forward pass, so `module.state_dict()` silently returns empty
tensors (LongLoRA #160). Every read of trained weights (export, EMA) goes through `gathered`.
GatheredParameters is a collective: EVERY rank must enter it with the same parameters, in the
same order, or the job hangs.

Why fp32 master weights: under bf16/fp16 DeepSpeed casts the module's parameters to the compute
dtype and keeps the fp32 weights the optimizer updates in its own (partitioned) buffers. A read
of the module gives the weights rounded to bf16 (8 bits of mantissa), not what was trained, and
not what a checkpoint holds (`spoxl export` merges the fp32 master copy from it). So trainable
parameters of such an engine are read with deepspeed.utils.safe_get_full_fp32_param, which
assembles the full fp32 tensor at ZeRO 1/2/3 (a collective at every stage: all ranks, same order).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

# Gather at most this many elements at once (fp32: 1 GiB); SDXL's UNet is 2.6 G elements, so a
# full-UNet export gathers in a few chunks instead of materialising everything on the accelerator.
GATHER_CHUNK_ELEMENTS = 256 * 1024 * 1024


def unwrap(model):
    """The underlying nn.Module of a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model) if _is_engine(model) else model


def _is_engine(model) -> bool:
    # By class name, so plain-module use never imports deepspeed (slow, and it probes accelerators).
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 managed parameter (its .data may be empty until gathered)."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Element count of the full parameter, whether or not it is currently partitioned."""
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None):
    """Make the full data of `params` visible on all ranks inside the block.

    With `modifier_rank=r`, writes made on rank r inside the block are re-partitioned to every
    rank on exit; with None the data is read-only. A no-op for plain tensors.
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def _chunks(params: list[tuple[str, torch.Tensor]], limit: int):
    chunk, size = [], 0
    for name, p in params:
        n = full_numel(p)
        if chunk and size + n > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, p))
        size += n
    if chunk:
        yield chunk


def _fp32_master_reader(model):
    """safe_get_full_fp32_param for a DeepSpeed engine that computes in bf16/fp16, else None."""
    if not _is_engine(model) or not (model.bfloat16_enabled() or model.fp16_enabled()):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param


def gathered_state_dict(
    model,
    keep: Callable[[str, torch.Tensor], bool] | None = None,
    rank0_only: bool = False,
    chunk_elements: int = GATHER_CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """{state_dict name: fp32 CPU copy} of `model`'s parameters and buffers, gathered under ZeRO-3.

    `keep(name, tensor)` filters entries (e.g. LoRA only, trainable only). Collective under
    ZeRO-3: call it on every rank. With rank0_only, other ranks get {} (they still take part in
    the gathers). Names are those of `module.state_dict()` (peft's `base_layer` included).
    """
    module = unwrap(model)
    # state_dict() names == named_parameters() names for parameters; keep duplicates (tied
    # weights) once, as state_dict does not (it lists every alias; we copy each alias).
    named = [(n, p) for n, p in module.named_parameters(remove_duplicate=False) if keep is None or keep(n, p)]
    buffers = [(n, b) for n, b in module.named_buffers() if keep is None or keep(n, b)]
    persistent = set(module.state_dict(keep_vars=True).keys())
    out: dict[str, torch.Tensor] = {}
    write = not rank0_only or is_rank0()
    master = _fp32_master_reader(model)
    if master is not None:
        # Trainable params: DeepSpeed's fp32 master copy (one collective per parameter; the
        # optimizer's partitions are gathered by DeepSpeed itself, so no GatheredParameters).
        rest = []
        for name, p in named:
            full = master(p) if p.requires_grad else None
            if full is None:  # frozen, or an optimizer without an fp32 copy (same on every rank)
                rest.append((name, p))
            elif write:
                out[name] = full.detach().to("cpu", torch.float32, copy=True)
        named = rest
    for chunk in _chunks(named, chunk_elements):
        with gathered([p for _, p in chunk]):
            if write:
                for name, p in chunk:
                    out[name] = p.detach().to("cpu", torch.float32, copy=True)
    if write:
        for name, b in buffers:
            if name in persistent:
                out[name] = b.detach().to("cpu", copy=True)
    return out


# ---- ranks, with or without torch.distributed ---------------------------------------------------


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if _dist_ready() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _dist_ready() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if _dist_ready():
        torch.distributed.barrier()


def first_error_on_any_rank(error: str | None) -> str | None:
    """Collective: the error of the lowest rank that has one (the same on every rank), or None."""
    if world_size() == 1:
        return error
    dist = torch.distributed
    flag = torch.tensor([0.0 if error is None else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return None
    messages = [None] * world_size()
    dist.all_gather_object(messages, error)
    return next(m for m in messages if m is not None)


def raise_on_every_rank(error: str | None) -> None:
    """Collective: every rank raises SharedError(<first error by rank>) when any rank has one."""
    from spoxl.errors import SharedError

    error = first_error_on_any_rank(error)
    if error is not None:
        raise SharedError(error)


@contextlib.contextmanager
def errors_on_every_rank():
    """Run the block; if it raised on any rank, raise the same one-line SpoxlError on every rank.

    Collective (every rank must enter it, also those with nothing to do inside). The block itself
    must not run collectives: a rank that fails half-way would leave the others waiting in them.
    """
    from spoxl.errors import SpoxlError

    error = None
    try:
        yield
    except SpoxlError as e:
        error = str(e)
    except Exception as e:  # e.g. a full disk while rank 0 writes: still one line, on every rank
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise_on_every_rank(error)
