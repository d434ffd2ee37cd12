"""benchmarks/gpu_check.py in its CPU mode (what CI keeps working for the GPU run): every op is
checked against the fp64 oracle under the interpreter, the launch and sync counters count what
they claim, and a wrong kernel shows as FAIL."""

import csv

import pytest
import torch

from kernel_oracles import INTERPRETER, load_gpu_check

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="CPU mode runs the kernels under the interpreter")


@pytest.fixture(scope="module")
def gpu_check():
    yield from load_gpu_check("gpu_check")


def test_cpu_mode_runs_every_section_and_passes(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--cpu", "--reps", "1", "--out-dir", str(tmp_path)]) == 0
    assert "CPU mode" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "gpu_check_cpu.csv")))
    sections = {r["section"] for r in rows}
    assert sections == {"correctness", "launches", "syncs", "speed", "unet"}
    checked = {r["op"] for r in rows if r["section"] == "correctness" and r["status"] == "PASS"}
    assert checked == set(gpu_check.ALL_OPS)
    assert not [r for r in rows if r["status"] == "FAIL"]
    # every dtype, the odd shape, B = 1 and every pool size are among the cases
    cases = " ".join(r["case"] for r in rows if r["section"] == "correctness")
    for needle in ("fp32", "mixed_bf16", "fp16", "odd_3x3x5x7", "b1_1x", "_k1", "_k4", "ncp_", "philox_seed_4611686018427387903"):
        assert needle in cases, needle
    launches = {r["op"]: int(r["value"]) for r in rows if r["metric"] == "triton_kernels"}
    assert launches["spo_loss"] == 3 and launches["pool_step"] == 2  # reduction + head + backward; step + log-prob head


def test_counters_see_launches_and_host_syncs(gpu_check):
    from spoxl.kernels import backend_ops

    T = backend_ops("triton")
    x = torch.randn(2, 3, 4, 4)
    args, kwargs, grad_idx = gpu_check.make_inputs("diffusion_dpo_loss", (2, 3, 4, 4), "fp32", torch.device("cpu"))
    call = gpu_check.prepare(T.diffusion_dpo_loss, "diffusion_dpo_loss", args, kwargs, grad_idx)
    call()
    triton_n, torch_n, syncs = gpu_check.count_launches(call)
    assert triton_n == 3 and torch_n > 0 and syncs == 0
    # a planted .item() and a tensor literal are counted as host syncs; views are free
    assert gpu_check.count_launches(lambda: x.sum().item()) == (0, 2, 1)  # the sum and the copy out
    assert gpu_check.count_launches(lambda: torch.tensor([0.3, 0.35]))[2] == 1
    assert gpu_check.count_launches(lambda: x.view(2, -1).t().unsqueeze(0))[:2] == (0, 0)


def test_a_wrong_kernel_fails_the_correctness_check(gpu_check, monkeypatch):
    from spoxl.kernels import backend_ops

    T, reference = backend_ops("triton"), backend_ops("torch")

    real = T.mapo_loss

    def off_by_a_bit(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * 1.001, metrics

    monkeypatch.setattr(T, "mapo_loss", off_by_a_bit)
    report = gpu_check.Report("test")
    gpu_check.check_correctness(report, T, reference, torch.device("cpu"), {"tiny": (2, 4, 8, 8)}, (2, 16, 4, 4))
    failed = {r["op"] for r in report.failures()}
    assert failed == {"mapo_loss"}


def test_half_precision_tolerance_floors_at_the_smallest_subnormal_step_only(gpu_check):
    """An fp16 gradient below fp16's resolution (NCP-SFT at the feature shape, ~1e-8) cannot be
    stored closer than one subnormal step (2^-24): the check allows that much and no more."""
    oracle = torch.full((4,), 1e-8, dtype=torch.float64)
    stored = oracle.to(torch.float16)  # what an exact kernel writes
    assert gpu_check.excess(stored, oracle, *gpu_check._tolerance(stored, oracle)) <= 1
    assert gpu_check.excess(stored + 3 * 2**-24, oracle, *gpu_check._tolerance(stored, oracle)) > 1
    fp32 = oracle.float()  # fp32 has no such floor: a relative error of 1e-3 still fails
    assert gpu_check.excess(fp32 * 1.001, oracle, *gpu_check._tolerance(fp32, oracle)) > 1
    big = torch.full((4,), 1.0, dtype=torch.float64)  # at O(1) the floor is negligible
    assert gpu_check.excess(big.half() * 1.01, big, *gpu_check._tolerance(big.half(), big)) > 1


def test_cuda_syncs_counts_and_locates_a_sync(gpu_check, monkeypatch):
    """The sync check (CUDA only) counts debug-mode warnings and names where the first one came
    from; here torch's debug mode is stood in for by a switch the probe reads."""
    import warnings

    mode = {"now": 0}
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.update(now=m))

    def syncing():
        if mode["now"] == "warn":
            warnings.warn("called a synchronizing CUDA operation")
        elif mode["now"] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")

    count, sites = gpu_check.cuda_syncs(syncing)
    assert count == 1 and "test_gpu_check.py" in sites[0] and "synchronizing" in sites[-1]
    assert mode["now"] == 0  # the debug mode is switched off again
    assert gpu_check.cuda_syncs(lambda: None) == (0, [])


def test_gradients_below_half_precision_resolution_are_reported_not_graded(gpu_check):
    """Under the subnormal floor a zero or sign-flipped fp16 gradient would pass: such rows are INFO."""
    tiny = torch.full((4,), 1e-8, dtype=torch.float64)
    assert gpu_check.below_resolution(tiny.half(), tiny)
    assert not gpu_check.below_resolution(tiny.float(), tiny)  # fp32 resolves it: graded
    big = torch.full((4,), 1e-3, dtype=torch.float64)
    assert not gpu_check.below_resolution(big.half(), big)


def test_ideal_traffic_leaves_out_what_a_loss_never_reads(gpu_check):
    args, _, grad_idx = gpu_check.make_inputs("ncp_loss_sft", (2, 3, 4, 4), "mixed_bf16", torch.device("cpu"))
    every = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    refs = sum(args[i].numel() * args[i].element_size() for i in (2, 3))
    assert gpu_check.ideal_bytes(args, grad_idx, False, "ncp_loss_sft") == every - refs
    assert gpu_check.ideal_bytes(args, grad_idx, False, "ncp_loss_dpo") == every  # DPO reads its reference
