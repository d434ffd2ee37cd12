"""benchmarks/kernels.py still runs: a tiny torch-only sweep writes a CSV with the device named
in every row and the file name, and a PNG."""

import csv
import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def test_quick_benchmark_writes_csv_and_plot(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    argv = ["--quick", "--providers", "torch", "--ops", "transition_logprob", "pool_step", "--reps", "2",
            "--out-dir", str(tmp_path)]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets one intra-op thread on CPU
    assert "running the torch providers only" in capsys.readouterr().out
    (csv_path,) = tmp_path.glob("kernels_*_quick.csv")
    assert (tmp_path / (csv_path.stem + ".png")).stat().st_size > 0
    rows = list(csv.DictReader(open(csv_path)))
    device = rows[0]["device"]
    assert bench.slug(device) in csv_path.name
    assert {(r["kernel"], r["mode"]) for r in rows} == {
        ("transition_logprob", "forward"), ("transition_logprob", "backward"),
        ("transition_logprob", "full"), ("pool_step", "forward"),
    }  # fmt: skip
    assert {r["shape_name"] for r in rows if r["kernel"] == "pool_step"} == {"small_k2", "small_k4"}
    for r in rows:
        assert r["device"] == device and r["provider"] == "torch"
        assert float(r["ms_p50"]) > 0 and float(r["gb_per_s"]) > 0
