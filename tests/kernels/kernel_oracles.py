"""Independent plain-autograd oracles for spoxl.kernels, written out from the formulas in
methods.md (not imported from spoxl), computed in fp64 from the (upcast) inputs.

Also the tolerance policy: fp32 tight, fp16/bf16 at the output dtype's rounding. Gradients are
stored in the input dtype, and the Triton interpreter truncates fp32 -> bf16 (measured), so bf16
needs >= 1 ulp (2^-7 relative) of slack.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from spoxl.kernels import use_backend

# tests/conftest.py turns the interpreter on unless the caller set TRITON_INTERPRET=0 (GPU runs).
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")



@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs a test on both backends: the torch reference, and the real Triton kernels under the
    interpreter that tests/conftest.py turns on. (A fixture here, imported by the test modules,
    rather than a tests/kernels/conftest.py: a second module named `conftest` on sys.path would
    shadow tests/conftest.py for `from conftest import ...` elsewhere.)"""
    if request.param == "triton" and not INTERPRETER:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (GPU runs: test_kernels_gpu.py)")
    monkeypatch.delenv("SPOXL_KERNELS", raising=False)
    with use_backend(request.param):
        yield request.param


# (rtol, atol relative to the reference's largest magnitude) per input dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# Values reduced in fp32 from identical inputs differ only by summation order.
LOSS_TOLERANCE = (1e-5, 1e-6)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=torch.float32, name: str = "") -> None:
    rtol, atol_rel = TOLERANCES[dtype]
    expected = expected.detach().double().cpu()
    atol = atol_rel * float(expected.abs().max()) + 1e-12
    actual = actual.detach().double().cpu()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_loss_close(actual, expected, name: str = "loss") -> None:
    rtol, atol = LOSS_TOLERANCE
    torch.testing.assert_close(
        torch.as_tensor(actual).double().cpu(), torch.as_tensor(expected).double().cpu(), rtol=rtol, atol=atol,
        msg=lambda m: f"{name}: {m}",
    )  # fmt: skip


def leaf(x: torch.Tensor) -> torch.Tensor:
    """An fp64 copy requiring grad: the oracle's view of a (possibly half-precision) input."""
    return x.detach().double().requires_grad_(True)


def mse(pred, target):
    return ((pred - target.detach()) ** 2).flatten(1).mean(1)


def gaussian_logprob(x, mean, std):
    """mean over elements of log N(x; mean, std^2), std a [B] tensor."""
    s = std.view(-1, *([1] * (x.ndim - 1)))
    density = -((x.detach() - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return density.flatten(1).mean(1)


def spo(x_w, x_l, mean_w, mean_l, ref_w, ref_l, std, beta, clip):
    def log_ratio(x, m, r):
        return gaussian_logprob(x, m, std) - gaussian_logprob(x, r.detach(), std)

    lr_w, lr_l = log_ratio(x_w, mean_w, ref_w), log_ratio(x_l, mean_l, ref_l)
    r_w = torch.clamp(torch.exp(lr_w), 1 - clip, 1 + clip)
    r_l = torch.clamp(torch.exp(lr_l), 1 - clip, 1 + clip)
    logit = beta * torch.log(r_w) - beta * torch.log(r_l)
    return -F.logsigmoid(logit).mean(), logit, lr_w, lr_l


def diffusion_dpo(pred_w, pred_l, ref_w, ref_l, target_w, target_l, beta):
    model_diff = mse(pred_w, target_w) - mse(pred_l, target_l)
    ref_diff = mse(ref_w.detach(), target_w) - mse(ref_l.detach(), target_l)
    logit = -beta / 2 * (model_diff - ref_diff)
    return -F.logsigmoid(logit).mean(), logit


def mapo(pred_w, pred_l, target_w, target_l, beta, snr, num_train_timesteps):
    def g(m):
        return snr * m / (torch.exp(snr * m) - 1)

    m_w, m_l = mse(pred_w, target_w), mse(pred_l, target_l)
    margin = g(m_w) - g(m_l)
    loss = m_w.mean() - beta * F.logsigmoid(num_train_timesteps * margin).mean()
    return loss, margin


def ncp(feat_w, feat_l, ref_w, ref_l, target_w, target_l, beta, kind):
    m_w, m_l = mse(feat_w, target_w), mse(feat_l, target_l)
    d_theta = m_w - m_l
    if kind == "sft":
        return m_w.mean(), -beta * d_theta
    if kind == "cpo":
        logit = -beta * d_theta
    else:
        logit = beta * ((mse(ref_w.detach(), target_w) - mse(ref_l.detach(), target_l)) - d_theta)
    return -F.logsigmoid(logit).mean(), logit


def load_gpu_check(module_name: str = "gpu_check"):
    """benchmarks/gpu_check.py as a module (it is a script, not a package member), registered in
    sys.modules under module_name while a test uses it. A generator for a pytest fixture."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location(module_name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
