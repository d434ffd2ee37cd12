"""Backend choice: SPOXL_KERNELS read at call time, auto on CPU = torch, forced-unavailable
raises a one-line SpoxlError, and importing spoxl.kernels does not import triton."""

import os
import subprocess
import sys

import pytest
import torch

import spoxl.kernels as K
from spoxl.errors import SpoxlError
from kernel_oracles import INTERPRETER
from kernel_oracles import backend  # noqa: F401 (fixture)
from spoxl.kernels import dispatch

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("SPOXL_KERNELS", raising=False)


needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="forces Triton on CPU tensors")


def _logprob_grad_fn_name() -> str:
    mean = torch.randn(2, 3, 4, 4, requires_grad=True)
    return type(K.transition_logprob(torch.randn(2, 3, 4, 4), mean, 0.5).grad_fn).__name__


def test_auto_on_cpu_picks_torch():
    assert dispatch.requested_backend() == "auto"
    assert K.choose_backend(CPU) == "torch"
    assert _logprob_grad_fn_name() == "MeanBackward1"  # plain autograd: the torch reference ran


@needs_interpreter
def test_env_var_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("SPOXL_KERNELS", "triton")
    assert K.choose_backend(CPU) == "triton"
    assert _logprob_grad_fn_name() == "TransitionLogprobBackward"  # the Triton Function ran
    monkeypatch.setenv("SPOXL_KERNELS", "torch")
    assert K.choose_backend(CPU) == "torch"
    assert _logprob_grad_fn_name() == "MeanBackward1"


@needs_interpreter
def test_use_backend_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv("SPOXL_KERNELS", "torch")
    with K.use_backend("triton"):
        assert K.choose_backend(CPU) == "triton"
        with K.use_backend("torch"):
            assert K.choose_backend(CPU) == "torch"
        assert K.choose_backend(CPU) == "triton"
    assert K.choose_backend(CPU) == "torch"


def test_unknown_backend_names_raise(monkeypatch):
    monkeypatch.setenv("SPOXL_KERNELS", "cuda")
    with pytest.raises(SpoxlError, match="SPOXL_KERNELS='cuda' is not one of auto, torch, triton"):
        K.choose_backend(CPU)
    with pytest.raises(SpoxlError):
        with K.use_backend("fast"):
            pass


def test_forced_triton_without_triton_raises_but_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setenv("SPOXL_KERNELS", "triton")
    with pytest.raises(SpoxlError, match="Triton backend is unavailable: triton cannot be imported") as info:
        K.transition_logprob(torch.randn(2, 4), torch.randn(2, 4), 1.0)
    assert "\n" not in str(info.value)
    monkeypatch.setenv("SPOXL_KERNELS", "auto")
    assert K.choose_backend(CPU) == "torch"
    monkeypatch.setattr(dispatch, "_said", set())
    with pytest.warns(RuntimeWarning, match="CUDA inputs use the torch backend: triton cannot be imported"):
        assert K.choose_backend(torch.device("cuda")) == "torch"  # auto never raises; it says why, once


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("SPOXL_KERNELS", "triton")
    ops = sys.modules.get(dispatch._TRITON_MODULE)
    if ops is not None:  # already imported (interpreted): pretend it was compiled for a GPU
        monkeypatch.setattr(ops, "INTERPRETED", False)
        expected = "imported without TRITON_INTERPRET=1"
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        expected = "CPU tensors need TRITON_INTERPRET=1"
    with pytest.raises(SpoxlError, match=expected):
        K.choose_backend(CPU)


def test_package_import_does_not_import_triton():
    env = {k: v for k, v in os.environ.items() if k != "SPOXL_KERNELS"}
    code = (
        "import sys, torch, spoxl.kernels as K\n"
        "assert 'triton' not in sys.modules, 'triton imported at package import'\n"
        "x = torch.randn(2, 3)\n"
        "K.spo_loss(x, x, x, x, x, x, 1.0, beta=10.0, clip=0.1)\n"
        "assert 'triton' not in sys.modules, 'the torch backend imported triton'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: K.diffusion_dpo_loss(*[torch.randn(2, 4)] * 5, torch.randn(3, 4), beta=5000.0), "target_l has shape"),
        (lambda: K.spo_loss(*[torch.randn(2, 4)] * 6, std=-1.0, beta=10.0, clip=0.1), "std must be > 0"),
        (lambda: K.spo_loss(*[torch.randn(2, 4)] * 6, std=torch.ones(3), beta=10.0, clip=0.1), "one value per sample"),
        (lambda: K.spo_loss(*[torch.randn(2, 4)] * 6, std=1.0, beta=10.0, clip=1.5), "clip must be in"),
        (lambda: K.mapo_loss(*[torch.randn(2, 4)] * 3, torch.randn(2, 4).long(), beta=0.1, snr=0.5, num_train_timesteps=1000), "must be fp16, bf16"),
        (lambda: K.ncp_loss(*[torch.randn(2, 4)] * 6, beta=2500.0, kind="ipo"), "ncp kind must be one of"),
        (lambda: K.ncp_loss(torch.randn(2, 4), torch.randn(2, 4), None, None, *[torch.randn(2, 4)] * 2, beta=2500.0, kind="dpo"), "needs ref"),
        (lambda: K.pool_step(torch.randn(2, 4), torch.randn(2, 4), 0.5, 0.6, 1.0, 0), "positive int"),
        (lambda: K.pool_step(torch.randn(2, 4), torch.randn(2, 4), 0.5, 0.6, 1.0, 2, noise=torch.randn(2, 4)), "noise"),
        (lambda: K.pool_step(torch.randn(2, 4), torch.randn(2, 4), 0.5, 0.6, 1.0, 2, seed=-3), "seed"),
        (lambda: K.pool_step(torch.randn(2, 4), torch.randn(2, 4), torch.rand(3), 0.6, 1.0, 2), "alpha_bar_t must"),
        (lambda: K.pool_logprobs(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), 1.0), "at least one more"),
        (lambda: K.transition_logprob(torch.randn(4), torch.randn(4), 1.0), "batch dimension"),
    ],
)
def test_bad_inputs_raise_one_line_errors(backend, call, message):
    with pytest.raises(SpoxlError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_cuda_inputs_with_the_interpreter_on_use_torch_and_say_so_once(monkeypatch):
    """The guard of issue 17: TRITON_INTERPRET=1 on a GPU machine would send every launch through
    the host. `auto` takes the torch path for CUDA inputs and warns once; a forced triton backend
    is a one-line error naming why. (Decided from the device alone: no CUDA tensor is made.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_said", set())
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1 is set"):
        assert K.choose_backend(cuda) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call is silent
        assert K.choose_backend(cuda) == "torch"
    with K.use_backend("triton"), pytest.raises(SpoxlError, match="TRITON_INTERPRET=1 is set"):
        K.choose_backend(cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if dispatch.sys.modules.get(dispatch._TRITON_MODULE) is None or not dispatch.sys.modules[dispatch._TRITON_MODULE].INTERPRETED:
        assert K.choose_backend(cuda) == "triton"  # the compiled kernels, once the interpreter is off


def test_loss_settings_have_no_defaults_in_the_kernels():
    """beta, clip, snr, T and NCP's kind live in the method configs only (tests/methods/
    test_paper_defaults.py holds them to the papers): every backend's op requires them, so a call
    that drops one fails instead of silently using a second copy of a default."""
    import inspect

    from spoxl.kernels import backend_ops

    required = {"spo_loss": ("beta", "clip"), "diffusion_dpo_loss": ("beta",),
                "mapo_loss": ("beta", "snr", "num_train_timesteps"), "ncp_loss": ("beta", "kind")}  # fmt: skip
    backends = {"public": K, "torch": backend_ops("torch")}
    if INTERPRETER:  # importing the kernels without the interpreter would fix them as compiled
        backends["triton"] = backend_ops("triton")
    for backend, ops in backends.items():
        for op, names in required.items():
            params = inspect.signature(getattr(ops, op)).parameters
            for name in names:
                assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (backend, op, name)
                assert params[name].default is inspect.Parameter.empty, (backend, op, name)
