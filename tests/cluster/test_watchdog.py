"""The failure watchdog over a real TCPStore: in-process rounds with a fake clock, then two real
processes (gloo, no DeepSpeed) where one is SIGKILLed inside a collective."""

import datetime
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from spoxl.cluster.watchdog import FAILURE_EXIT_CODE, Watchdog, is_communication_error, settings_from_env

HERE = Path(__file__).resolve().parent


class Exited(BaseException):  # like os._exit, nothing may swallow it
    pass


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def store(master_port):
    server = dist.TCPStore("127.0.0.1", master_port, 1, True, timeout=datetime.timedelta(seconds=10),
                           wait_for_workers=False)
    yield server


def _client(port):
    return dist.TCPStore("127.0.0.1", port, 1, False, timeout=datetime.timedelta(seconds=10))


def _ring(store, port, world=3, timeout_s=30.0):
    clock, logs, exits = Clock(), [], []

    def exit_fn(code):
        exits.append(code)
        raise Exited()

    dogs = [Watchdog(_client(port), r, world, timeout_s=timeout_s, interval_s=5.0, exit_fn=exit_fn, clock=clock,
                     log=logs.append) for r in range(world)]
    for d in dogs:
        d.store.set(f"spoxl/watchdog/who/{d.rank}", f"node{d.rank} pid {100 + d.rank}")
    return dogs, clock, logs, exits


def _tick(dog):
    try:
        dog.tick()
        return None
    except Exited:
        return dog.rank


def test_dead_rank_is_named_by_its_watcher_and_ends_every_rank(store, master_port):
    dogs, clock, logs, exits = _ring(store, master_port)
    for _ in range(3):  # all alive: nobody complains however long it runs
        clock.now += 5
        assert [_tick(d) for d in dogs] == [None, None, None]
    # rank 2 dies: it beats no more. Rank 1 watches rank 2; it last saw a new beat at t=20 (the
    # beat rank 2 made at t=15), so it stays quiet until more than 30 s later.
    for _ in range(7):
        clock.now += 5
        assert _tick(dogs[0]) is None and _tick(dogs[1]) is None
    clock.now += 5
    assert _tick(dogs[0]) is None  # rank 0 watches rank 1, which is alive
    assert _tick(dogs[1]) == 1
    assert "rank 2 (node2 pid 102) stopped responding: no heartbeat for 35 s" in logs[-1]
    # Every other rank reads the record at its next round and exits, printing the same cause.
    assert _tick(dogs[0]) == 0
    assert "rank 2 (node2 pid 102) stopped responding" in logs[-1] and logs[-1].startswith(
        "spoxl watchdog: rank 0 ends the job")
    assert exits == [FAILURE_EXIT_CODE, FAILURE_EXIT_CODE]


def test_rank_that_finished_cleanly_is_not_declared_dead(store, master_port):
    dogs, clock, logs, exits = _ring(store, master_port, world=2)
    dogs[1].finish()
    for _ in range(20):
        clock.now += 5
        assert _tick(dogs[0]) is None
    assert exits == [] and logs == []


def test_exception_in_a_rank_is_recorded_and_named(store, master_port):
    dogs, clock, logs, exits = _ring(store, master_port)
    dogs[1].on_exception(ValueError("bad latent shape [2, 3]"))
    assert logs[-1] == "spoxl watchdog: rank 1 (node1 pid 101) raised ValueError: bad latent shape [2, 3]"
    clock.now += 5
    assert _tick(dogs[2]) == 2
    assert "rank 1 (node1 pid 101) raised ValueError: bad latent shape [2, 3]" in logs[-1]


def test_nonzero_exit_status_is_recorded(store, master_port):
    dogs, clock, logs, exits = _ring(store, master_port, world=2)
    dogs[0].on_exit_status(2)
    assert logs[-1] == "spoxl watchdog: rank 0 (node0 pid 100) exited with status 2"
    clock.now += 5
    assert _tick(dogs[1]) == 1 and "rank 0 (node0 pid 100) exited with status 2" in logs[-1]


def test_communication_error_waits_for_the_real_cause(store, master_port):
    dogs, clock, logs, exits = _ring(store, master_port, world=2, timeout_s=0.6)
    dogs[0].interval_s = 0.1
    clock.now = 0.0
    _tick(dogs[0])  # rank 0 has seen rank 1 beat once; rank 1 then dies
    clock.now = 1.0  # the fake clock says rank 1 has been silent for longer than the timeout
    dogs[0].on_exception(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234"))
    assert "stops after a communication error; cause: rank 1 (node1 pid 101) stopped responding" in logs[-1]
    assert dogs[0].published_failure().startswith("rank 1 (node1 pid 101) stopped responding")


def test_lost_store_means_rank0_died(master_port):
    server = dist.TCPStore("127.0.0.1", master_port, 1, True, timeout=datetime.timedelta(seconds=10),
                           wait_for_workers=False)
    logs, exits = [], []
    dog = Watchdog(_client(master_port), 1, 2, timeout_s=30, interval_s=5, exit_fn=exits.append, log=logs.append,
                   store_address=f"127.0.0.1:{master_port}")
    dog.tick()
    del server  # the process hosting the store (rank 0) is gone
    time.sleep(0.2)
    dog.tick()
    assert exits == [FAILURE_EXIT_CODE]
    assert f"lost the job's rendezvous store at 127.0.0.1:{master_port} (hosted by rank 0's process)" in logs[-1]


def test_two_processes_exception_in_one_rank(tmp_path, master_port):
    """Rank 1 raises; rank 0, inside all_reduce, gets a socket error but names rank 1's exception."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "WORLD_SIZE": "2",
           "SPOXL_WATCHDOG_TIMEOUT_S": "4", "SPOXL_WATCHDOG_INTERVAL_S": "0.5"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "watchdog_worker.py"), str(tmp_path), "raise"],
                              env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errs = [p.communicate(timeout=90)[1] for p in procs]
    # Rank 0 ends either from its watchdog thread (status 3) or from the socket error in all_reduce
    # (status 1), whichever comes first; rank 1 may be torn down by gloo while exiting (SIGABRT).
    assert procs[0].returncode in (1, FAILURE_EXIT_CODE) and procs[1].returncode != 0
    assert "rank 1 (" in errs[1] and "raised ValueError: bad latent shape [2, 3]" in errs[1]
    assert re.search(r"spoxl watchdog: rank 0 .*rank 1 \(\S+ pid \d+\) raised ValueError: bad latent shape", errs[0]), \
        errs[0][-2000:]


def test_helpers():
    assert is_communication_error(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert not is_communication_error(ValueError("bad latent shape"))
    assert settings_from_env({}) == (True, 60.0, 5.0)
    assert settings_from_env({"SPOXL_WATCHDOG": "0", "SPOXL_WATCHDOG_TIMEOUT_S": "9",
                              "SPOXL_WATCHDOG_INTERVAL_S": "1"}) == (False, 9.0, 1.0)
    with pytest.raises(ValueError):
        settings_from_env({"SPOXL_WATCHDOG_TIMEOUT_S": "1", "SPOXL_WATCHDOG_INTERVAL_S": "5"})


@pytest.mark.parametrize("mode", ["collective", "hang"])
def test_two_processes_sigkill(tmp_path, master_port, mode):
    """Rank 1 is SIGKILLed. collective: both loop over all_reduce, rank 0's gloo call raises, and
    rank 0 must exit non-zero quickly naming rank 1 (not blaming itself for the socket error).
    hang: rank 0's main thread is blocked for good (a NCCL collective never returns), and the
    watchdog thread must end the process with FAILURE_EXIT_CODE."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "WORLD_SIZE": "2",
           "SPOXL_WATCHDOG_TIMEOUT_S": "4", "SPOXL_WATCHDOG_INTERVAL_S": "0.5"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "watchdog_worker.py"), str(tmp_path), mode],
                              env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    ready = tmp_path / "ready1"
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), "workers never started"
    time.sleep(1.0)
    killed_at = time.monotonic()
    procs[1].send_signal(signal.SIGKILL)
    _, err = procs[0].communicate(timeout=60)
    elapsed = time.monotonic() - killed_at
    procs[1].wait()
    assert procs[0].returncode == (FAILURE_EXIT_CODE if mode == "hang" else 1)
    assert elapsed < 4 + 2 * 0.5 + 10, elapsed
    assert "rank 1 (" in err and "stopped responding" in err, err[-2000:]


def test_exit_status_carries_the_error_of_the_rank_that_failed_first(store, master_port):
    # Rank 1 hits a data error its peers do not (yet): the job-wide line every rank prints names
    # the reason, not only "rank 1 exited with status 2".
    from spoxl.cluster import watchdog

    dogs, clock, logs, exits = _ring(store, master_port)
    watchdog.note_error("dataset /data/shard-7.parquet row 12: label 'yes' is not a number")
    try:
        dogs[1].on_exit_status(2)
    finally:
        watchdog._last_error.message = None
    expected = ("rank 1 (node1 pid 101) exited with status 2: dataset /data/shard-7.parquet row 12: "
                "label 'yes' is not a number")
    assert logs[-1] == f"spoxl watchdog: {expected}"
    clock.now += 5
    assert _tick(dogs[2]) == 2 and expected in logs[-1]
