"""fp64 gradcheck of every Triton autograd.Function, run through the interpreter (small sizes).

The kernels accumulate in fp64 for fp64 inputs, so finite differences are meaningful. Each
Function is checked with a multi-chunk layout too (N > one block), patched small to stay cheap.
"""

import pytest
import torch
from torch.autograd import gradcheck

import spoxl.kernels._triton_ops as T
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


@pytest.mark.parametrize("shape", SHAPES)
def test_pair_squared_error(shape, check):
    args = (_r(shape, True), _r(shape, True), _r(shape), _r(shape), _r(shape), _r(shape))
    assert check(lambda *a: T.PairSquaredError.apply(*a)[:2], args)


@pytest.mark.parametrize("shape", SHAPES)
def test_pair_squared_error_without_reference(shape, check):
    args = (_r(shape, True), _r(shape, True), _r(shape), _r(shape), None, None)
    assert check(lambda *a: T.PairSquaredError.apply(*a)[:2], args)


@pytest.mark.parametrize("shape", SHAPES)
def test_spo_log_ratios(shape, check):
    std = torch.rand(shape[0], dtype=torch.float64) + 0.5
    args = (_r(shape), _r(shape), _r(shape, True), _r(shape, True), _r(shape), _r(shape), std)
    assert check(T.SpoLogRatios.apply, args)


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


def test_full_losses_in_fp64():
    """The Functions composed with the [B] heads: gradcheck the losses end to end (fast mode:
    random projections of the Jacobian, since every column costs interpreter launches)."""
    shape = (2, 2, 3, 3)
    std = torch.tensor([0.5, 0.8], dtype=torch.float64)
    x = [_r(shape) for _ in range(2)]
    means = [(x[i] + 0.3 * _r(shape)).detach().requires_grad_(True) for i in range(2)]
    refs = [(m + 0.02 * _r(shape)).detach() for m in means]
    assert gradcheck(lambda mw, ml: T.spo_loss(x[0], x[1], mw, ml, refs[0], refs[1], std).double(), means, fast_mode=True)
    t = [_r(shape) for _ in range(2)]
    preds = [(t[i] + 0.05 * _r(shape)).detach().requires_grad_(True) for i in range(2)]
    ref_preds = [t[i] + 0.05 * _r(shape) for i in range(2)]
    assert gradcheck(lambda pw, pl: T.diffusion_dpo_loss(pw, pl, *ref_preds, *t, beta=50.0).double(), preds, fast_mode=True)
    assert gradcheck(lambda pw, pl: T.mapo_loss(pw, pl, *t, num_train_timesteps=10).double(), preds, fast_mode=True)
    assert gradcheck(lambda pw, pl: T.ncp_loss(pw, pl, *ref_preds, *t, beta=20.0).double(), preds, fast_mode=True)
