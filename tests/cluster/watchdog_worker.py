"""Helper process for test_watchdog: a gloo rank looping over all_reduce under watch_job().
Not a test module (no test_ prefix). argv[1]: folder for the ready marker; argv[2] == "hang":
after the first all_reduce, rank 0 blocks without ever raising (as a rank stuck inside a NCCL
collective does), so only the watchdog thread can end it; argv[2] == "raise": rank 1 raises a
ValueError at its 50th step."""

import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from spoxl.cluster.watchdog import watch_job

with watch_job():
    # A long process-group timeout: only the watchdog may end this job quickly.
    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    x = torch.ones(4)
    for step in range(100000):
        dist.all_reduce(x)
        x.fill_(1.0)
        if step == 0:
            (Path(sys.argv[1]) / f"ready{os.environ['RANK']}").touch()
            if sys.argv[2:] == ["hang"] and os.environ["RANK"] == "0":
                threading.Event().wait()  # blocks forever, GIL released
        if sys.argv[2:] == ["raise"] and os.environ["RANK"] == "1" and step == 50:
            raise ValueError("bad latent shape [2, 3]")
        time.sleep(0.01)
