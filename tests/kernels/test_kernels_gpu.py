"""The compiled Triton kernels on a GPU against the torch reference run in fp64 (skipped without CUDA).

Run on a GPU machine with the interpreter off, this file alone:
    TRITON_INTERPRET=0 .venv/bin/pytest -q tests/kernels/test_kernels_gpu.py
Checks SDXL-sized inputs (8 x 4 x 128 x 128: 32 blocks per sample) in fp32 and bf16, values and
gradients, and the Philox noise of pool_step. (Run on an H200 on 2026-12-04: docs/kernels.md, "On a GPU".)
"""

import pytest
import torch

from kernel_oracles import INTERPRETER, assert_close, assert_loss_close
from spoxl.kernels import backend_ops

R, T = backend_ops("torch"), backend_ops("triton")

pytestmark = pytest.mark.skipif(
    INTERPRETER or not torch.cuda.is_available(), reason="needs CUDA and TRITON_INTERPRET=0"
)
SHAPE = (8, 4, 128, 128)
DEVICE = "cuda"


def _inputs(n, dtype, scale=1.0):
    return [(torch.randn(SHAPE, device=DEVICE) * scale).to(dtype) for _ in range(n)]


def _compare(op_name, make, grad_idx, dtype, **kwargs):
    args = make()
    results = {}
    for name, module in (("torch", R), ("triton", T)):
        # The reference runs on the inputs upcast to fp64 (the oracle): in fp32 its log-ratios are
        # differences of near-equal sums, rounded worse than the fused kernels' per-element form.
        upcast = (lambda a: a.double()) if name == "torch" else (lambda a: a)
        leaves = [upcast(a).clone().requires_grad_(i in grad_idx) if isinstance(a, torch.Tensor) else a
                  for i, a in enumerate(args)]  # fmt: skip
        loss, metrics = getattr(module, op_name)(*leaves, **kwargs, return_metrics=True)
        (1.7 * loss).backward()
        results[name] = (loss, metrics, [leaves[i].grad for i in grad_idx])
    (loss_r, metrics_r, grads_r), (loss_t, metrics_t, grads_t) = results["torch"], results["triton"]
    assert_loss_close(loss_t, loss_r)
    for key in metrics_r:
        assert_loss_close(metrics_t[key], metrics_r[key], key)
    for g_t, g_r in zip(grads_t, grads_r):
        if g_r is None:  # an input the loss does not use (SFT's loser): no gradient, or zeros
            assert g_t is None or not g_t.any(), f"{op_name}: gradient into an unused input"
            continue
        assert_close(g_t, g_r.float(), dtype, name=f"{op_name} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_match_reference_on_gpu(dtype):
    def pairs(scale):
        t_w, t_l = _inputs(2, torch.float32)
        noise = _inputs(4, torch.float32, scale)
        preds = [t_w + noise[0], t_l + noise[1], t_w + noise[2], t_l + noise[3]]
        return [p.to(dtype) for p in preds] + [t_w.to(dtype), t_l.to(dtype)]

    # Each method's recipe beta (methods.md), so the gradients are at training scale.
    _compare("diffusion_dpo_loss", lambda: pairs(0.02), (0, 1), dtype, beta=5000.0)
    for kind in ("dpo", "cpo", "sft"):
        _compare("ncp_loss", lambda: pairs(0.02), (0, 1), dtype, beta=2500.0, kind=kind)
    _compare("mapo_loss", lambda: [p for i, p in enumerate(pairs(0.05)) if i not in (2, 3)], (0, 1), dtype,
             beta=0.1, snr=0.5, num_train_timesteps=1000)  # fmt: skip

    def spo_inputs():
        std = torch.full((SHAPE[0],), 0.5, device=DEVICE)
        x_w, x_l = _inputs(2, torch.float32)
        m_w, m_l = x_w - 0.5 * torch.randn_like(x_w), x_l - 0.5 * torch.randn_like(x_l)
        r_w, r_l = m_w + 0.015 * torch.randn_like(m_w), m_l + 0.015 * torch.randn_like(m_l)
        return [t.to(dtype) for t in (x_w, x_l, m_w, m_l, r_w, r_l)] + [std]

    _compare("spo_loss", spo_inputs, (2, 3), dtype, beta=10.0, clip=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_ops_match_reference_on_gpu(dtype):
    x_t, eps = _inputs(2, dtype)
    noise = torch.randn(SHAPE[0], 4, *SHAPE[1:], device=DEVICE)
    s_t, m_t, std_t = T.pool_step(x_t, eps, 0.3, 0.35, 1.0, 4, noise=noise)
    s_r, m_r, std_r = R.pool_step(x_t, eps, 0.3, 0.35, 1.0, 4, noise=noise)
    assert_close(s_t, s_r.float(), dtype, name="samples")
    assert_close(m_t, m_r, torch.float32, name="mean")
    mean_t = m_t.clone().requires_grad_(True)
    mean_r = m_r.clone().requires_grad_(True)
    lp_t, ref_t = T.pool_logprobs(s_t, mean_t, m_t, std_t)
    lp_r, ref_r = R.pool_logprobs(s_t, mean_r, m_r, std_r)
    assert_close(lp_t, lp_r, torch.float32, name="logp")
    assert_close(ref_t, ref_r, torch.float32, name="ref_logp")
    lp_t.sum().backward()
    lp_r.sum().backward()
    assert_close(mean_t.grad, mean_r.grad, torch.float32, name="grad mean")


def test_philox_pool_noise_on_gpu():
    x_t, eps = _inputs(2, torch.float32)
    samples, mean, std = T.pool_step(x_t, eps, 0.3, 0.35, 1.0, 4, seed=123)
    z = (samples - mean.unsqueeze(1)) / std.view(-1, 1, 1, 1, 1)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert torch.equal(samples, T.pool_step(x_t, eps, 0.3, 0.35, 1.0, 4, seed=123)[0])
