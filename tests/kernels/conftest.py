"""Kernel tests run every op on both backends: the torch reference and the real Triton kernels
under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports them)."""

import pytest

from kernel_oracles import INTERPRETER
from spoxl.kernels import use_backend


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs the test body with the backend forced (SPOXL_KERNELS from the caller's shell is ignored)."""
    if request.param == "triton" and not INTERPRETER:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (GPU runs: test_kernels_gpu.py)")
    monkeypatch.delenv("SPOXL_KERNELS", raising=False)
    with use_backend(request.param):
        yield request.param
