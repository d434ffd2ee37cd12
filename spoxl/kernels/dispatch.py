"""The one place that picks a kernel backend.

SPOXL_KERNELS (read at every call, so tests and scripts can switch it):
  auto    (default) Triton when the inputs are on CUDA and triton imports, else torch; silent,
          except on CUDA inputs with TRITON_INTERPRET=1 set: torch, and a warning once (the
          interpreter would copy every launch through the host).
  torch   the pure-torch references (spoxl.kernels.reference, each loss module's `reference`), any device.
  triton  the Triton kernels; on CPU tensors only with TRITON_INTERPRET=1 (the interpreter).
          Unavailable -> SpoxlError naming why (a forced backend never falls back silently).
`use_backend(name)` overrides the variable inside a `with` block.

The Triton module is imported lazily: importing spoxl.kernels never imports triton.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch

from spoxl.errors import SpoxlError

ENV_VAR = "SPOXL_KERNELS"
BACKENDS = ("auto", "torch", "triton")
_TRITON_MODULE = "spoxl.kernels._triton_ops"

_override: str | None = None


def requested_backend() -> str:
    """The backend asked for: use_backend()'s override, else $SPOXL_KERNELS, else auto."""
    name = _override if _override is not None else os.environ.get(ENV_VAR, "auto")
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        raise SpoxlError(f"{ENV_VAR}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for the duration of a `with` block (takes precedence over the env var)."""
    global _override
    if name not in BACKENDS:
        raise SpoxlError(f"kernel backend {name!r} is not one of {', '.join(BACKENDS)}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton backend can run on `device`, else a short reason."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton cannot be imported ({exc})"
    loaded = sys.modules.get(_TRITON_MODULE)
    if device.type == "cuda":
        if _interpreter_requested() or (loaded is not None and loaded.INTERPRETED):
            return ("TRITON_INTERPRET=1 is set: the interpreter would run the kernels on the host, copying "
                    "every CUDA tensor there and back at each launch")
        return None
    if device.type != "cpu":
        return f"Triton kernels do not run on {device.type} tensors"
    # The interpreter is chosen when the kernels are decorated (at import), not at launch.
    if loaded is not None and not loaded.INTERPRETED:
        return "the Triton kernels were imported without TRITON_INTERPRET=1, so they cannot run on CPU tensors"
    if loaded is None and not _interpreter_requested():
        return "CPU tensors need TRITON_INTERPRET=1 set before the kernels are first used"
    return None


def choose_backend(device: torch.device) -> str:
    """'torch' or 'triton' for inputs on `device`, following the rule in the module docstring."""
    name = requested_backend()
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return "torch"  # decided without importing triton (the import alone costs seconds)
    reason = triton_unavailable_reason(device)
    if name == "triton":
        if reason is not None:
            raise SpoxlError(f"{ENV_VAR}=triton but the Triton backend is unavailable: {reason}")
        return "triton"
    if reason is not None and device.type == "cuda":
        _say_once(f"spoxl.kernels: CUDA inputs use the torch backend: {reason}")
    return "triton" if reason is None else "torch"


_said: set = set()


def _say_once(message: str) -> None:
    """A warning printed once per process (the dispatcher runs at every op call)."""
    if message not in _said:
        _said.add(message)
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)


def backend_module(device: torch.device):
    """The module implementing the ops for `device` (reference or _triton_ops, imported on demand)."""
    if choose_backend(device) == "triton":
        return importlib.import_module(_TRITON_MODULE)
    from spoxl.kernels import reference

    return reference
