"""Bad recipes and bad data: one-line errors, non-zero exits, no hangs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def spoxl_train(args, tmp_path, num_ranks=2, timeout=240):
    from test_engine_launcher import env

    cmd = [str(BIN / "spoxl"), "train", "--num-gpus", str(num_ranks), "--master-port", str(free_port()),
           "--config", "configs/tiny_sft.yaml", "--set", f"run.output_dir={tmp_path / 'run'}",
           "--set", "logging.progress=false", *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("spoxl train: error")]  # "(rank N)" too


def one_error(proc, *needles):
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_key(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lrr: 1\n")
    proc = subprocess.run([str(BIN / "spoxl"), "train", "--config", str(tmp_path / "c.yaml")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    one_error(proc, "unknown key train.lrr")
    assert proc.returncode == 2


def test_batch_sizes_that_do_not_divide(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 5, "zero_optimization": {"stage": 2}}))
    proc = spoxl_train(["--set", f"deepspeed.config={tmp_path / 'ds.json'}"], tmp_path)
    one_error(proc, "train_batch_size=5 does not equal", "world size 2")


def test_missing_dataset(tmp_path):
    proc = spoxl_train(["--set", f"data.path={tmp_path / 'nope'}"], tmp_path)
    one_error(proc, "dataset", "nope does not exist")


@pytest.mark.launcher
def test_unreadable_image_on_one_rank_stops_every_rank(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i}")
    (data / "2.png").write_bytes(b"this is not a png")  # in rank 1's shard only (no shuffle)
    proc = spoxl_train(["--set", f"data.path={data}", "--set", "data.shuffle=false", "--set", "train.micro_batch_size=1",
                        "--set", "train.grad_accum=1", "--set", "logging.sample_every=0"], tmp_path)
    one_error(proc, "2.png")


@pytest.mark.launcher
def test_error_found_on_rank1_alone_is_the_jobs_last_word(tmp_path):
    """The lost-message race through the real launcher: rank 1 alone fails (its copy of the model
    is damaged) before any collective, rank 0 waits in DeepSpeed's first broadcast. The job must
    end non-zero, within the watchdog's time, with the reason on its last spoxl line, not only
    "rank 1 exited with status 2" (tests/engine/train_rank1_fails_first.py)."""
    import time

    from test_engine_launcher import launch

    sys.path.insert(0, str(REPO / "tests" / "engine"))
    from train_rank1_fails_first import MESSAGE

    started = time.monotonic()
    proc = launch([str(REPO / "tests/engine/train_rank1_fails_first.py"), "--config", "configs/tiny_sft.yaml",
                   "--set", f"run.output_dir={tmp_path / 'run'}", "--set", "logging.progress=false"],
                  timeout=240, SPOXL_WATCHDOG_TIMEOUT_S="10", SPOXL_WATCHDOG_INTERVAL_S="1")
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, proc.stderr[-3000:]
    # rank 1 says it once, as itself...
    lines = error_lines(proc)
    assert len(lines) == 1 and "(rank 1)" in lines[0] and MESSAGE in lines[0], proc.stderr[-3000:]
    # ...and the last line spoxl writes (the watchdog's job-wide verdict, printed by rank 0 when it
    # gives up waiting) carries the reason too, not only the exit status.
    spoxl_lines = [line for line in proc.stderr.splitlines() if "spoxl" in line and "Traceback" not in line]
    assert spoxl_lines and MESSAGE in spoxl_lines[-1], "\n".join(spoxl_lines[-5:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 150, elapsed  # launch (~20 s) + the watchdog's 10 s, not the 30-minute gloo timeout


def test_a_communication_error_without_a_watchdog_line_is_still_one_line(monkeypatch, capsys):
    """With no watchdog to name the cause (one rank, the watchdog off, or a rendezvous that never
    formed), a socket-level error ends the rank with status 1 and ONE line saying what failed,
    neither silently nor with a traceback; any other exception keeps its traceback (a bug)."""
    import threading

    from spoxl import train
    from spoxl.cluster import watchdog

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(watchdog, "_REPORTED", threading.Event())  # a fresh process: nothing reported yet

    def refused(args):
        raise RuntimeError("[c10d] The client socket has timed out after 60s while trying to connect to (10.0.0.1, 29500).")

    monkeypatch.setattr(train, "run", refused)
    assert train.main(["--config", "configs/tiny_sft.yaml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spoxl train: error: communication failed: RuntimeError:"), err
    monkeypatch.setattr(train, "run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.main(["--config", "configs/tiny_sft.yaml"])
