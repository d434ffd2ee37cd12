"""The four preference losses on both backends against the fp64 oracles: loss, metrics and the
gradients of every policy input, for fp32/fp16/bf16 inputs and odd and multi-chunk shapes.

Inputs are built so the logits are O(1) at the methods' default betas (a saturated logsigmoid
would make the gradient comparison vacuous). The loss is scaled by 1.7 before backward so the
grad_output != 1 path runs.
"""

import functools
import pytest
import torch

import spoxl.kernels as K
from kernel_oracles import INTERPRETER, assert_close, assert_loss_close, diffusion_dpo, leaf, mapo, ncp, spo
from kernel_oracles import backend  # noqa: F401 (fixture)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 4x8x8 latents, an odd non-power-of-two shape, and one with N = 2304 > one 2048 block (2 chunks).
SHAPES = [(2, 4, 8, 8), (3, 3, 5, 7)]
CHUNKED = (2, 4, 24, 24)
CASES = [(d, s) for d in DTYPES for s in SHAPES] + [(torch.float32, CHUNKED)]
GRAD_SCALE = 1.7


def _randn(shape, dtype, scale=1.0, base=None):
    x = torch.randn(shape) * scale
    if base is not None:
        x = base.float() + x
    return x.to(dtype)


def _check_grads(kernel_inputs, oracle_inputs, names, dtype):
    for name in names:
        assert kernel_inputs[name].grad is not None, f"no gradient reached {name}"
        assert kernel_inputs[name].grad.dtype == kernel_inputs[name].dtype
        assert_close(kernel_inputs[name].grad, oracle_inputs[name].grad, dtype, name=f"grad {name}")


def _run(op, inputs, oracle, oracle_args, names, dtype, **kwargs):
    """op on the kernel inputs (grads on `names`) vs the oracle on fp64 copies."""
    kernel_inputs = {n: (t.clone().requires_grad_(n in names)) for n, t in inputs.items()}
    loss, metrics = op(**kernel_inputs, **kwargs, return_metrics=True)
    (GRAD_SCALE * loss).backward()
    oracle_inputs = {n: leaf(t) for n, t in inputs.items()}
    expected_loss, logit, *extra = oracle(*[oracle_inputs[n] for n in oracle_args])
    (GRAD_SCALE * expected_loss).backward()
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert_loss_close(loss, expected_loss)
    _check_grads(kernel_inputs, oracle_inputs, names, dtype)
    assert all(not v.requires_grad and v.ndim == 0 for v in metrics.values())
    plain = op(**{n: t for n, t in inputs.items()}, **kwargs)  # return_metrics=False: just the loss
    assert isinstance(plain, torch.Tensor) and plain.ndim == 0
    assert torch.equal(plain.detach(), loss.detach()), "return_metrics must not change the loss"
    return metrics, logit.detach(), extra


def _accuracy(logit):
    return ((logit > 0).double() + 0.5 * (logit == 0).double()).mean()


@pytest.mark.parametrize("dtype,shape", CASES)
def test_spo_loss(backend, dtype, shape):
    batch = shape[0]
    std = torch.tensor([0.3, 0.5, 0.8])[:batch]
    s = std.view(-1, 1, 1, 1)
    x_w, x_l = torch.randn(shape), torch.randn(shape)
    mean_w, mean_l = x_w - s * torch.randn(shape), x_l - s * torch.randn(shape)
    inputs = {
        "x_w": x_w.to(dtype),
        "x_l": x_l.to(dtype),
        "mean_w": mean_w.to(dtype),
        "mean_l": mean_l.to(dtype),
        "ref_mean_w": (mean_w + 0.03 * s * torch.randn(shape)).to(dtype),
        "ref_mean_l": (mean_l + 0.03 * s * torch.randn(shape)).to(dtype),
    }
    oracle_args = ["x_w", "x_l", "mean_w", "mean_l", "ref_mean_w", "ref_mean_l"]
    inputs_std = dict(inputs)

    def op(**kw):
        return K.spo_loss(**kw, std=std, beta=10.0, clip=0.1)

    def oracle(*args):
        return spo(*args, std.double(), 10.0, 0.1)

    metrics, logit, (lr_w, lr_l) = _run(op, inputs_std, oracle, oracle_args, ["mean_w", "mean_l"], dtype)
    assert_loss_close(metrics["margin"], logit.mean(), "margin")
    assert_loss_close(metrics["implicit_acc"], _accuracy(logit), "implicit_acc")
    assert_loss_close(metrics["log_ratio_w"], lr_w.mean(), "log_ratio_w")
    assert_loss_close(metrics["log_ratio_l"], lr_l.mean(), "log_ratio_l")
    outside = (torch.cat([lr_w, lr_l]).exp() - 1).abs() > 0.1
    assert_loss_close(metrics["clamp_frac"], outside.double().mean(), "clamp_frac")


@pytest.mark.parametrize("dtype,shape", CASES)
def test_diffusion_dpo_loss(backend, dtype, shape):
    target_w, target_l = torch.randn(shape), torch.randn(shape)
    inputs = {
        "pred_w": _randn(shape, dtype, 0.02, target_w),
        "pred_l": _randn(shape, dtype, 0.02, target_l),
        "ref_pred_w": _randn(shape, dtype, 0.02, target_w),
        "ref_pred_l": _randn(shape, dtype, 0.02, target_l),
        "target_w": target_w.to(dtype),
        "target_l": target_l.to(dtype),
    }
    args = ["pred_w", "pred_l", "ref_pred_w", "ref_pred_l", "target_w", "target_l"]
    metrics, logit, _ = _run(
        functools.partial(K.diffusion_dpo_loss, beta=5000.0), inputs, lambda *a: diffusion_dpo(*a, 5000.0), args, ["pred_w", "pred_l"], dtype
    )
    assert 0.05 < logit.abs().max() < 20, "test inputs should give O(1) logits"
    assert_loss_close(metrics["margin"], logit.mean(), "margin")
    assert_loss_close(metrics["implicit_acc"], _accuracy(logit), "implicit_acc")


@pytest.mark.parametrize("dtype,shape", CASES)
def test_mapo_loss(backend, dtype, shape):
    target_w, target_l = torch.randn(shape), torch.randn(shape)
    inputs = {
        "pred_w": _randn(shape, dtype, 0.05, target_w),
        "pred_l": _randn(shape, dtype, 0.05, target_l),
        "target_w": target_w.to(dtype),
        "target_l": target_l.to(dtype),
    }
    args = ["pred_w", "pred_l", "target_w", "target_l"]
    metrics, margin, _ = _run(
        functools.partial(K.mapo_loss, beta=0.1, snr=0.5, num_train_timesteps=1000), inputs,
        lambda *a: mapo(*a, 0.1, 0.5, 1000), args, ["pred_w", "pred_l"], dtype
    )
    assert_loss_close(metrics["margin"], margin.mean(), "margin")
    assert_loss_close(metrics["implicit_acc"], _accuracy(margin), "implicit_acc")


@pytest.mark.parametrize("kind", ["dpo", "cpo", "sft"])
@pytest.mark.parametrize("dtype,shape", CASES)
def test_ncp_loss(backend, dtype, shape, kind):
    target_w, target_l = torch.randn(shape), torch.randn(shape)
    inputs = {
        "feat_w": _randn(shape, dtype, 0.02, target_w),
        "feat_l": _randn(shape, dtype, 0.02, target_l),
        "ref_feat_w": _randn(shape, dtype, 0.02, target_w),
        "ref_feat_l": _randn(shape, dtype, 0.02, target_l),
        "target_feat_w": target_w.to(dtype),
        "target_feat_l": target_l.to(dtype),
    }
    args = list(inputs)

    def op(**kw):
        return K.ncp_loss(**kw, beta=2500.0, kind=kind)

    # sft's loss does not depend on feat_l: only feat_w's gradient is compared.
    grads = ["feat_w"] if kind == "sft" else ["feat_w", "feat_l"]
    metrics, logit, _ = _run(op, inputs, lambda *a: ncp(*a, 2500.0, kind), args, grads, dtype)
    assert_loss_close(metrics["margin"], logit.mean(), "margin")
    assert_loss_close(metrics["implicit_acc"], _accuracy(logit), "implicit_acc")


def test_ncp_reference_free_kinds_accept_no_reference(backend):
    shape = (2, 3, 4, 4)
    f_w, f_l, t_w, t_l = (torch.randn(shape) for _ in range(4))
    for kind in ("cpo", "sft"):
        with_ref = K.ncp_loss(f_w, f_l, torch.randn(shape), torch.randn(shape), t_w, t_l, beta=2500.0, kind=kind)
        without = K.ncp_loss(f_w, f_l, None, None, t_w, t_l, beta=2500.0, kind=kind)
        assert torch.equal(with_ref, without)


@pytest.mark.skipif(not INTERPRETER, reason="forces Triton on CPU tensors")
def test_losses_agree_across_backends_with_the_papers_settings(monkeypatch):
    """The same call through both backends (the papers' settings), a direct torch-vs-triton check."""
    monkeypatch.delenv("SPOXL_KERNELS", raising=False)
    shape = (3, 4, 6, 6)
    t_w, t_l = torch.randn(shape), torch.randn(shape)
    preds = [t_w + 0.02 * torch.randn(shape), t_l + 0.02 * torch.randn(shape)]
    refs = [t_w + 0.02 * torch.randn(shape), t_l + 0.02 * torch.randn(shape)]
    results = {}
    for name in ("torch", "triton"):
        with K.use_backend(name):
            results[name] = (
                K.diffusion_dpo_loss(*preds, *refs, t_w, t_l, beta=5000.0),
                K.mapo_loss(*preds, t_w, t_l, beta=0.1, snr=0.5, num_train_timesteps=1000),
                K.ncp_loss(*preds, *refs, t_w, t_l, beta=2500.0, kind="dpo"),
            )
    for a, b in zip(results["torch"], results["triton"]):
        assert_loss_close(a, b)
