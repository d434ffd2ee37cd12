"""The launch budget of issue 17: every public op, fwd+bwd with metrics as training calls it, on
the Triton backend, issues at most 6 device launches (Triton kernels plus torch ops; views,
metadata and empty allocations are free) and no host sync (.item(), nonzero, tensor literals,
host-to-device copies). Counted with benchmarks/gpu_check.py's counter: a TorchDispatchMode plus
a wrapper around every launched kernel (here under the interpreter, whose own copies are not
counted). The GPU run of gpu_check.py counts the same on CUDA and adds cuda sync debug mode."""


import pytest
import torch

from kernel_oracles import INTERPRETER, load_gpu_check

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="the Triton kernels run on CPU under the interpreter")
BUDGET = 6


@pytest.fixture(scope="module")
def gpu_check():
    yield from load_gpu_check("gpu_check_budget")


def _ops():
    return ["spo_loss", "diffusion_dpo_loss", "mapo_loss", "ncp_loss_dpo", "ncp_loss_cpo", "ncp_loss_sft",
            "transition_logprob", "pool_logprobs", "pool_step"]  # fmt: skip


@pytest.mark.parametrize("op", _ops())
@pytest.mark.parametrize("dtype", ["fp32", "mixed_bf16"])
def test_op_stays_within_the_launch_budget_without_host_syncs(gpu_check, op, dtype):
    from spoxl.kernels import backend_ops

    T = backend_ops("triton")
    assert set(_ops()) == set(gpu_check.ALL_OPS)  # every public op is covered
    args, kwargs, grad_idx = gpu_check.make_inputs(op, (2, 4, 8, 8), dtype, torch.device("cpu"), k=4)
    call = gpu_check.prepare(gpu_check.op_function(T, op), op, args, kwargs, grad_idx, metrics=True)
    call()  # warm: parameter caches, upstream gradients
    triton_n, torch_n, syncs = gpu_check.count_launches(call)
    assert triton_n >= 1, "the Triton backend did not run"
    assert triton_n + torch_n <= BUDGET, (op, triton_n, torch_n)
    assert syncs == 0, (op, syncs)


def test_sampler_step_with_logprobs_is_two_launches_from_host_alphas(gpu_check):
    """The SPO sampler's call: alphas as the scheduler gives them (1-element CPU tensors), a
    62-bit seed, log-probs asked for: one step kernel and one small head, nothing else."""
    from spoxl.kernels import _triton_ops as T

    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a, a_prev = torch.tensor(0.3), torch.tensor(0.35)
    call = lambda: T.pool_step(x, eps, a, a_prev, 1.0, 4, seed=2**62 - 5, return_logprob=True)  # noqa: E731
    call()
    assert gpu_check.count_launches(call) == (2, 0, 0)
    assert gpu_check.count_launches(lambda: T.pool_step(x, eps, a, a_prev, 1.0, 1, seed=9)) == (1, 0, 0)


def test_the_counter_fails_a_planted_extra_launch(gpu_check, monkeypatch):
    """The budget test can fail: an op that adds torch work (as the old metrics path did) is over."""
    from spoxl.kernels import backend_ops

    real = backend_ops("triton").diffusion_dpo_loss

    def with_torch_metrics(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss, {name: (v.double() * 1.0).float() for name, v in metrics.items()}

    args, kwargs, grad_idx = gpu_check.make_inputs("diffusion_dpo_loss", (2, 4, 8, 8), "fp32", torch.device("cpu"))
    call = gpu_check.prepare(with_torch_metrics, "diffusion_dpo_loss", args, kwargs, grad_idx)
    call()
    triton_n, torch_n, _ = gpu_check.count_launches(call)
    assert triton_n + torch_n > BUDGET
