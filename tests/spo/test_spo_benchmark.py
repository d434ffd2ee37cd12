"""benchmarks/spo_step.py runs both paths on the tiny model and reports what it claims."""

import csv
import importlib.util
from pathlib import Path

import torch

from spo_threads import one_thread  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("spo_step", REPO / "benchmarks" / "spo_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_spo_step_benchmark_compares_the_two_paths(tmp_path, capsys):
    bench = load_bench()
    assert bench.main(["--steps", "6", "--divert", "1", "--inner", "1", "--repeats", "1", "--lora-rank", "4",
                       "--out", str(tmp_path)]) == 0  # fmt: skip
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "spo_step_tiny_cpu.csv"))}
    ours, plain = rows["ours"], rows["straightforward"]
    assert int(ours["pairs"]) == int(plain["pairs"]) > 0  # same noise, threshold 0: the same pairs
    assert int(ours["sample_unet_calls"]) == 6  # one call per denoising step for the whole pool
    assert int(plain["sample_unet_calls"]) > int(ours["sample_unet_calls"])
    assert float(ours["train_unet_calls_per_pair"]) < float(plain["train_unet_calls_per_pair"])
    assert "ratios (ours / straightforward)" in capsys.readouterr().out


def test_each_path_starts_from_the_same_weights():
    # main() builds fresh components per path; the same seed must give the same UNet + LoRA
    bench = load_bench()
    cpu = torch.device("cpu")
    a = bench.build("tiny", cpu, torch.float32, 4, 0)[0].unet.state_dict()
    b = bench.build("tiny", cpu, torch.float32, 4, 0)[0].unet.state_dict()
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
