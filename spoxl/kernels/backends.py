"""Every op of one backend by name, with no validation or dispatch in front: for benchmarks and
the tests that compare the backends (the public ops in spoxl.kernels dispatch per call)."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

from spoxl.errors import SpoxlError
from spoxl.kernels import losses, reference
from spoxl.kernels.dispatch import _TRITON_MODULE

SAMPLING_OPS = ("pool_step", "transition_logprob", "pool_logprobs")


def backend_ops(backend: str) -> SimpleNamespace:
    """Every op's implementation on one backend ('torch' or 'triton'), by its public name, with no
    validation or dispatch in front: for benchmarks and the tests that compare backends."""
    if backend not in ("torch", "triton"):
        raise SpoxlError(f"backend must be torch or triton, got {backend!r}")
    sampling = reference if backend == "torch" else importlib.import_module(_TRITON_MODULE)
    ops = {name: getattr(sampling, name) for name in SAMPLING_OPS}
    ops.update({name: module.reference if backend == "torch" else module.fused for name, module in losses.LOSSES.items()})
    return SimpleNamespace(**ops)
