"""An error met on rank 0 alone inside a collective export stops EVERY rank with the same
one-line SpoxlError (2 plain gloo ranks, no DeepSpeed launcher)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port

HERE = Path(__file__).resolve().parent


def test_rank0_export_error_reaches_every_rank(tmp_path):
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "errors_worker.py"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    for case, needle in (("lora", "has shape (1,)"), ("unet", "nope.weight")):
        results = [(tmp_path / f"{case}_rank{r}.txt").read_text() for r in range(2)]
        assert results[0] == results[1], (case, results)
        assert results[0].startswith("SpoxlError: ") and needle in results[0] and "\n" not in results[0], results[0]
    assert not (tmp_path / "unet").exists()
