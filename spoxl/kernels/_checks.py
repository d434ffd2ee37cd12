"""Input validation shared by both backends: a bad call fails with one-line SpoxlError, before
any kernel launches (a wrong shape inside a Triton kernel would read out of bounds, not raise)."""

from __future__ import annotations

import torch

from spoxl.errors import SpoxlError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, x, *, min_ndim: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise SpoxlError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise SpoxlError(f"{name} must be fp16, bf16, fp32 or fp64, got {x.dtype}")
    if x.ndim < min_ndim:
        raise SpoxlError(f"{name} must have a batch dimension and at least one more, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise SpoxlError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def same_shape(names_and_tensors: dict) -> None:
    """All given tensors share the first one's shape and device."""
    items = [(n, t) for n, t in names_and_tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items:
        tensor(name, t)
        if t.shape != first.shape:
            raise SpoxlError(f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}")
        if t.device != first.device:
            raise SpoxlError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def per_sample(name: str, v, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    """A float or a [B] (or [B, 1, ...]) tensor as a detached [B] tensor of `dtype` on `device`."""
    t = torch.as_tensor(v, dtype=dtype, device=device).detach()
    if t.ndim == 0:
        return t.expand(batch).contiguous()
    if t.numel() != batch:
        raise SpoxlError(f"{name} must be a float or hold one value per sample ({batch}), got shape {tuple(t.shape)}")
    return t.reshape(batch).contiguous()


def pool_size(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SpoxlError(f"k (the pool size) must be a positive int, got {k!r}")
    return k


def std(std, batch: int) -> None:
    """std: a float > 0, or one value per sample (tensor values are not inspected: that would sync)."""
    if isinstance(std, torch.Tensor):
        if std.numel() not in (1, batch):
            raise SpoxlError(
                f"std must be a float or hold one value per sample ({batch}), got shape {tuple(std.shape)}"
            )
    elif not float(std) > 0:
        raise SpoxlError(f"std must be > 0, got {std}")
