"""fp64 gradcheck of every Triton autograd.Function, run through the interpreter (small sizes).

The kernels accumulate in fp64 for fp64 inputs, so finite differences are meaningful. Each
Function is checked with a multi-chunk layout too (N > one block), patched small to stay cheap.
"""

import pytest
import torch
from torch.autograd import gradcheck

import spoxl.kernels._triton_ops as T
from spoxl.kernels.losses import dpo, mapo, ncp, spo
from kernel_oracles import INTERPRETER

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="runs the kernels on CPU tensors: needs TRITON_INTERPRET=1")

SHAPES = [(2, 2, 3, 3), (2, 3, 5)]  # 18 and 15 (odd) elements per sample


@pytest.fixture(params=["one_block", "multi_chunk"])
def check(request, monkeypatch):
    """gradcheck with one block per sample (full Jacobian), or with the block shrunk to 8 so each
    sample spans several programs and a masked tail (fast mode: random Jacobian projections,
    because every Jacobian column costs interpreter launches)."""
    fast = request.param == "multi_chunk"
    if fast:
        monkeypatch.setattr(T, "MAX_BLOCK", 8)
    return lambda fn, args: gradcheck(fn, args, eps=1e-6, atol=1e-7, fast_mode=fast)


def _r(shape, grad=False):
    return torch.randn(shape, dtype=torch.float64, requires_grad=grad)


def _near(base, scale):
    return (base + scale * torch.randn_like(base)).detach()


# (Triton head, params (beta, clip|snr, T), with reference): betas small enough for O(1) logits.
PAIR_LOSSES = {
    "diffusion_dpo": (lambda: dpo.triton_heads()["diffusion_dpo"], (50.0, 0.0, 0.0), True),
    "mapo": (lambda: mapo.triton_heads()["mapo"], (0.1, 0.5, 10.0), False),
    "ncp_dpo": (lambda: ncp.triton_heads()["dpo"], (20.0, 0.0, 0.0), True),
    "ncp_cpo": (lambda: ncp.triton_heads()["cpo"], (20.0, 0.0, 0.0), False),
    "ncp_sft": (lambda: ncp.triton_heads()["sft"], (20.0, 0.0, 0.0), False),
}


@pytest.mark.parametrize("loss", list(PAIR_LOSSES))
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_pair_loss(shape, loss, check):
    head, params, has_ref = PAIR_LOSSES[loss]
    t_w, t_l = _r(shape), _r(shape)
    preds = (_near(t_w, 0.3).requires_grad_(True), _near(t_l, 0.3).requires_grad_(True))
    refs = (_near(t_w, 0.3), _near(t_l, 0.3)) if has_ref else (None, None)

    def fn(p_w, p_l):
        return T.FusedPairLoss.apply(head(), params, p_w, p_l, t_w, t_l, *refs)[0]

    assert check(fn, preds)


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_spo_loss(shape, check):
    std = torch.rand(shape[0], dtype=torch.float64) + 0.5
    x_w, x_l = _r(shape), _r(shape)
    means = (_near(x_w, 0.5).requires_grad_(True), _near(x_l, 0.5).requires_grad_(True))
    refs = (_near(means[0], 0.02), _near(means[1], 0.02))

    def fn(m_w, m_l):
        return T.FusedSpoLoss.apply(spo.triton_heads()["spo"], (10.0, 0.1, 0.0), x_w, x_l, m_w, m_l, *refs, std)[0]

    assert check(fn, means)


@pytest.mark.parametrize("shape", SHAPES)
def test_transition_logprob(shape, check):
    std = torch.rand(shape[0], dtype=torch.float64) + 0.5
    assert check(T.TransitionLogprob.apply, (_r(shape), _r(shape, True), std))


@pytest.mark.parametrize("shape", SHAPES)
def test_pool_logprobs(shape, check):
    k = 3
    std = torch.rand(shape[0], dtype=torch.float64) + 0.5
    samples = _r((shape[0], k, *shape[1:]))
    assert check(T.PoolLogprobs.apply, (samples, _r(shape, True), _r(shape, True), std))


def test_public_losses_in_fp64():
    """The public wrappers end to end (fast mode), including the metrics path staying off the graph."""
    shape = (2, 2, 3, 3)
    std = torch.tensor([0.5, 0.8], dtype=torch.float64)
    x = [_r(shape) for _ in range(2)]
    means = [_near(x[i], 0.3).requires_grad_(True) for i in range(2)]
    refs = [_near(m, 0.02) for m in means]
    assert gradcheck(lambda mw, ml: spo.fused(x[0], x[1], mw, ml, *refs, std, beta=10.0, clip=0.1), means, fast_mode=True)
    t = [_r(shape) for _ in range(2)]
    preds = [_near(t[i], 0.05).requires_grad_(True) for i in range(2)]
    ref_preds = [_near(t[i], 0.05) for i in range(2)]
    assert gradcheck(lambda pw, pl: dpo.fused(pw, pl, *ref_preds, *t, beta=50.0), preds, fast_mode=True)
    assert gradcheck(
        lambda pw, pl: mapo.fused(pw, pl, *t, beta=0.1, snr=0.5, num_train_timesteps=10, return_metrics=True)[0], preds, fast_mode=True
    )
    assert gradcheck(lambda pw, pl: ncp.fused(pw, pl, *ref_preds, *t, beta=20.0, kind="dpo"), preds, fast_mode=True)
