"""What every loss module shares, in plain torch (importing it never imports triton).

A loss splits into (1) per-sample reductions over C*H*W -- MSEs or Gaussian log-ratios, the
memory-bound part the shared Triton reduction kernels fuse -- and (2) a little scalar math on [B]
vectors (logsigmoid, clamp, means): the loss's "head". Each loss module holds its head twice:
in torch (`head`, fp64, the reference and the oracle) and as a Triton device function
(`triton_heads()`, called by the shared head kernel, which also writes the metrics). This module
holds the helpers both torch heads and references use, and the one way a loss picks its backend.
"""

from __future__ import annotations

import torch

from spoxl.kernels.dispatch import choose_backend


def implicit_accuracy(logit: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose logit favours the winner; ties count one half (diffusers' convention)."""
    return ((logit > 0).float() + 0.5 * (logit == 0).float()).mean()


def fp64(*values):
    """The heads compute in fp64: they see only [B] values, so this costs nothing, and it removes
    the cancellation in differences of near-equal per-sample values (MaPO's margin is a difference
    of two scores near 1; DPO's logit multiplies a small MSE difference by beta/2)."""
    return [None if v is None else v.double() for v in values]


def finish(loss: torch.Tensor, metrics, dtype: torch.dtype):
    """(loss in the per-sample values' dtype -- fp32, or fp64 under gradcheck --, detached fp32
    metrics); `metrics` is a callable so that nothing is computed (no extra launches) unless asked."""
    return loss.to(dtype), ({name: v.detach().float() for name, v in metrics().items()} if metrics else {})


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] mean over non-batch dims of (pred - target)^2 in fp32; the target is a constant."""
    return ((pred.float() - target.detach().float()) ** 2).flatten(1).mean(1)


def maybe_metrics(loss_and_metrics, return_metrics: bool):
    """(loss, metrics) when asked for, else the loss (the head then computed no metrics at all)."""
    return loss_and_metrics if return_metrics else loss_and_metrics[0]


def uses_triton(device: torch.device) -> bool:
    """Whether a loss on `device` runs its fused Triton path (spoxl.kernels.dispatch's rule)."""
    return choose_backend(device) == "triton"


def triton_ops():
    """The shared Triton launchers, imported on first use (the import alone costs seconds)."""
    from spoxl.kernels import _triton_ops

    return _triton_ops


def bind_triton(namespace: dict) -> None:
    """Bind `tl` (triton.language) and `K` (the shared Triton helpers) as globals of a loss module,
    when its triton_heads() first runs. Module globals, not closures: the interpreter re-runs a
    Triton function's source against its module's globals (triton.language included)."""
    import triton.language

    from spoxl.kernels import _triton_kernels

    namespace["tl"], namespace["K"] = triton.language, _triton_kernels
