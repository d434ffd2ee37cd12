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
