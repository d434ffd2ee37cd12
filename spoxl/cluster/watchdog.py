"""A job-wide failure watchdog: when one rank dies, every rank exits non-zero, naming it.

Why: the deepspeed launcher only watches the processes of ITS node. When a rank dies (an
exception, or SIGKILL from the OOM killer), its node's launcher kills that node's ranks, but the
ranks on the other nodes wait in their next collective: with NCCL until the process-group
timeout (train.dist_timeout_minutes, 30 min by default), with gloo until a socket error that
blames whichever rank noticed it. And DeepSpeed's launcher log names the last command it
spawned, not the process that failed.

How: through the job's own rendezvous store (the TCPStore that torch.distributed already runs,
hosted by rank 0), every rank
  * bumps a heartbeat counter every `interval_s` from a daemon thread (collectives release the
    GIL, so a rank blocked in a collective still beats; a dead or frozen process does not);
  * watches ONE peer, the next rank in a ring (rank r watches r+1 mod world), so the store sees
    a constant few operations per rank per interval however large the job; a peer whose counter
    has not moved for `timeout_s` (and that has not finished cleanly) is declared dead;
  * reads the job's failure record every interval.
The first diagnosis is written once to the failure record (compare-and-set), and every rank that
reads it prints it and exits with FAILURE_EXIT_CODE; the local launchers then kill their
siblings. An exception in a rank is recorded as "rank R (host) raised X" - unless it is a
communication error, which is a symptom: that rank then waits (up to timeout_s) for the
diagnosis of the peer that really died. Losing the store itself means rank 0 (or its node) died.

Worst case from a death to every rank exiting: timeout_s + 2 * interval_s (defaults 60 s + 10 s),
plus the launcher's 30 s SIGTERM grace: under the 2-minute bound. Tunable with the environment
variables SPOXL_WATCHDOG_TIMEOUT_S / SPOXL_WATCHDOG_INTERVAL_S (the launch scripts forward them);
SPOXL_WATCHDOG=0 disables it. Use:

    from spoxl.cluster.watchdog import watch_job
    with watch_job():          # before or after init_distributed: it starts once the group exists
        train(...)
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from typing import Callable

FAILURE_EXIT_CODE = 3  # "ended by the watchdog" (an exception in the rank itself exits with 1)
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_INTERVAL_S = 5.0
_PREFIX = "spoxl/watchdog"
_FAILED = f"{_PREFIX}/failed"
_DONE_COUNT = f"{_PREFIX}/done_count"
_ACKS = f"{_PREFIX}/failure_acks"  # ranks that recorded or read the job's failure

_COMM_ERROR_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "connection refused",
                     "broken pipe", "timed out", "timeout", "socket", "peer")


def _hb(rank: int) -> str:
    return f"{_PREFIX}/hb/{rank}"


def _who(rank: int) -> str:
    return f"{_PREFIX}/who/{rank}"


def _done(rank: int) -> str:
    return f"{_PREFIX}/done/{rank}"


def settings_from_env(env=None) -> tuple[bool, float, float]:
    """(enabled, timeout_s, interval_s) from SPOXL_WATCHDOG / _TIMEOUT_S / _INTERVAL_S."""
    env = os.environ if env is None else env
    enabled = env.get("SPOXL_WATCHDOG", "1") not in ("0", "false", "no", "off")
    timeout = float(env.get("SPOXL_WATCHDOG_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    interval = float(env.get("SPOXL_WATCHDOG_INTERVAL_S", DEFAULT_INTERVAL_S))
    if timeout <= 0 or interval <= 0 or interval >= timeout:
        raise ValueError(f"watchdog needs 0 < SPOXL_WATCHDOG_INTERVAL_S ({interval}) < "
                         f"SPOXL_WATCHDOG_TIMEOUT_S ({timeout})")
    return enabled, timeout, interval


def is_communication_error(exc: BaseException) -> bool:
    """A collective/socket failure: a symptom of another rank's death, not a diagnosis."""
    try:
        import torch.distributed as dist

        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    except ImportError:
        pass
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, (RuntimeError, ConnectionError, OSError)) and any(w in text for w in _COMM_ERROR_WORDS)


class Watchdog:
    """Heartbeats + ring watch + failure record over a torch.distributed Store (see module doc)."""

    def __init__(self, store, rank: int, world_size: int, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 interval_s: float = DEFAULT_INTERVAL_S, store_address: str = "",
                 exit_fn: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] | None = None):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.store_address = store_address
        self.exit_fn, self.clock = exit_fn, clock
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.peer = (rank + 1) % world_size
        self._peer_beats = -1
        self._peer_seen_at = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ended = False

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "Watchdog":
        self.store.set(_who(self.rank), f"{socket.gethostname()} pid {os.getpid()}")
        self.store.add(_hb(self.rank), 1)
        self._peer_seen_at = self.clock()
        self._thread = threading.Thread(target=self._run, name="spoxl-watchdog", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 5)

    def finish(self, wait_s: float | None = None) -> None:
        """Clean end of this rank: stop beating, mark it done so its watcher does not declare it
        dead; rank 0 (the store's host) stays until every rank is done, so the others do not
        lose the store while they wrap up."""
        self.stop()
        try:
            self.store.set(_done(self.rank), "1")
            self.store.add(_DONE_COUNT, 1)
            if self.rank == 0:
                deadline = time.monotonic() + (self.timeout_s if wait_s is None else wait_s)
                while self.store.add(_DONE_COUNT, 0) < self.world_size and time.monotonic() < deadline:
                    if self.store.check([_FAILED]):
                        break
                    time.sleep(min(0.2, self.interval_s))
        except Exception:
            pass  # the job is ending anyway; a lost store here changes nothing

    # ---- one round --------------------------------------------------------------------------------

    def tick(self) -> None:
        """Beat, read the failure record, check the watched peer (called every interval_s)."""
        try:
            self.store.add(_hb(self.rank), 1)
            failure = self.published_failure()
            if failure is not None:
                return self._end(failure)
            dead = self.dead_peer()
            if dead is not None:
                self.declare(dead)
        except Exception as e:  # the store is gone: its host, rank 0, died
            if not self._stop.is_set():
                self._end(self.lost_store_message(e))

    def dead_peer(self) -> str | None:
        """The diagnosis if the watched peer has not beaten for timeout_s (and is not done)."""
        if self.world_size < 2 or self.store.check([_done(self.peer)]):
            return None
        beats = self.store.add(_hb(self.peer), 0)
        now = self.clock()
        if beats != self._peer_beats:
            self._peer_beats, self._peer_seen_at = beats, now
            return None
        if now - self._peer_seen_at <= self.timeout_s:
            return None
        return (f"rank {self.peer} ({self.describe(self.peer)}) stopped responding: no heartbeat for "
                f"{now - self._peer_seen_at:.0f} s (killed, e.g. by the OOM killer, or frozen)")

    def lost_store_message(self, exc: BaseException) -> str:
        where = f" at {self.store_address}" if self.store_address else ""
        return (f"lost the job's rendezvous store{where} (hosted by rank 0's process): rank 0 or its node died "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")

    def describe(self, rank: int) -> str:
        try:
            if self.store.check([_who(rank)]):
                return self.store.get(_who(rank)).decode()
        except Exception:
            pass
        return "host unknown"

    def published_failure(self) -> str | None:
        if self.store.check([_FAILED]):
            return self.store.get(_FAILED).decode()
        return None

    def declare(self, message: str) -> None:
        """Record a diagnosis (the first one wins) and end this rank with it."""
        try:
            message = self.store.compare_set(_FAILED, "", message).decode()
        except Exception:
            pass
        self._end(message)

    def _end(self, message: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._stop.set()
        self._ack()
        self.log(f"spoxl watchdog: rank {self.rank} ends the job: {message}")
        self.exit_fn(FAILURE_EXIT_CODE)

    def _ack(self) -> None:
        try:
            self.store.add(_ACKS, 1)
        except Exception:
            pass

    def _linger_as_store_host(self) -> None:
        """Rank 0 hosts the job's store: after recording a failure it stays (up to timeout_s) until
        every other rank has recorded its own failure or read this one, so that none of them loses
        the store, and with it the reason, before it has printed it."""
        if self.rank != 0 or self.world_size < 2:
            return
        deadline = time.monotonic() + self.timeout_s
        try:
            while self.store.add(_ACKS, 0) < self.world_size and time.monotonic() < deadline:
                time.sleep(min(0.2, self.interval_s))
        except Exception:
            pass

    # ---- exceptions in the main thread --------------------------------------------------------------

    def on_exit_status(self, code) -> None:
        """This rank is exiting with a non-zero status without an exception (e.g. a one-line
        user error it printed itself): record it, with that error (note_error), as the job's failure."""
        self._stop.set()
        me = f"rank {self.rank} ({self.describe(self.rank)})"
        reason = getattr(_last_error, "message", None)
        self._record(me, f"exited with status {code}" + (f": {reason}" if reason else ""))
        self._linger_as_store_host()

    def _record(self, me: str, what: str) -> None:
        try:
            failure = self.store.compare_set(_FAILED, "", f"{me} {what}").decode()
        except Exception:
            failure = f"{me} {what}"
        self._ended = True
        self._ack()
        _REPORTED.set()
        self.log(f"spoxl watchdog: {me} {what}"
                 + ("" if failure.startswith(me) else f"; first failure in the job: {failure}"))

    def on_exception(self, exc: BaseException) -> None:
        """Record why this rank is failing. A communication error is a symptom: wait (up to
        timeout_s + 2 intervals) for the watchdog that diagnoses the dead peer, then print that."""
        self._stop.set()  # the main thread takes over; the thread must not exit under it
        me = f"rank {self.rank} ({self.describe(self.rank)})"
        if is_communication_error(exc):
            deadline = time.monotonic() + self.timeout_s + 2 * self.interval_s
            while time.monotonic() < deadline:
                try:
                    self.store.add(_hb(self.rank), 1)  # still alive: our own watcher must not blame us
                    failure = self.published_failure()
                    if failure is None:
                        # keep watching our peer from here: the thread has stopped
                        dead = self.dead_peer()
                        if dead is not None:
                            failure = self.store.compare_set(_FAILED, "", dead).decode()
                except Exception as e:
                    failure = self.lost_store_message(e)
                if failure is not None:
                    self._ended = True
                    self._ack()
                    _REPORTED.set()
                    self.log(f"spoxl watchdog: {me} stops after a communication error; cause: {failure}")
                    return
                time.sleep(min(self.interval_s, 1.0))
        self._record(me, "raised " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300])


def _default_group_watchdog(timeout_s: float, interval_s: float) -> Watchdog | None:
    import torch.distributed as dist

    world = dist.get_world_size()
    if world < 2:
        return None
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return Watchdog(_job_store(), dist.get_rank(), world, timeout_s=timeout_s, interval_s=interval_s,
                    store_address=address)


_STORE: dict = {}


def _job_store():
    """The watchdog's client of the job's rendezvous store (no extra port to open between nodes).

    Its OWN connection when the store's address is known (env:// rendezvous: MASTER_ADDR and
    MASTER_PORT): the process group's client is held for the whole of a blocking store wait (a
    group being created, a barrier) while a peer is gone, and the watchdog must read and write
    the failure record exactly then. Otherwise the default group's store (private accessor,
    stable since torch 1.x). One per process, created on first use."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if "store" not in _STORE:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if addr and port and port.isdigit():
            from datetime import timedelta

            client = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=30),
                                   wait_for_workers=False)  # fmt: skip
            _STORE["store"] = dist.PrefixStore("spoxl_watchdog", client)
        else:
            _STORE["store"] = distributed_c10d._get_default_store()
    return _STORE["store"]


class _Starter:
    """Starts the watchdog as soon as the default process group exists (polling from a thread),
    so `watch_job()` can wrap code that initialises torch.distributed itself."""

    def __init__(self, timeout_s: float, interval_s: float):
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.watchdog: Watchdog | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._wait_for_group, name="spoxl-watchdog-start", daemon=True)
        self._thread.start()

    def _wait_for_group(self) -> None:
        # Import torch.distributed at once, as before any wait: importing it from this thread while
        # the main thread is half-way through importing torch aborts the process (C++ terminate).
        import torch.distributed  # noqa: F401

        while not self._closed.wait(0.2):
            if self.start_if_ready():
                return

    def start_if_ready(self) -> bool:
        """Start the watchdog if the process group exists (once); True when it exists."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return False
        with self._lock:
            if not self._closed.is_set() and self.watchdog is None:
                try:
                    wd = _default_group_watchdog(self.timeout_s, self.interval_s)
                    self.watchdog = wd.start() if wd is not None else None
                except Exception as e:  # the store is already gone (its host, rank 0, exited)
                    self._closed.set()
                    print(f"spoxl watchdog: not started: the job's store is gone ({' '.join(str(e).split())[:160]})",
                          file=sys.stderr, flush=True)  # fmt: skip
        return True

    def close(self) -> Watchdog | None:
        with self._lock:
            self._closed.set()
        return self.watchdog


_active = threading.local()
_last_error = threading.local()
_REPORTED = threading.Event()  # this process's watchdog printed the job's failure line


def reported_failure() -> bool:
    """Whether the watchdog printed a line naming this rank's failure or its cause."""
    return _REPORTED.is_set()


def recorded_failure() -> str | None:
    """The job's failure record, if the process group exists and one was written (else None)."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        store = _job_store()
        return store.get(_FAILED).decode() if store.check([_FAILED]) else None
    except Exception:
        return None


def start_now() -> None:
    """Inside watch_job(), once this process joined the group: start the watchdog now rather than
    at its starter's next poll (a rank about to exit must be watched when it exits, or its exit
    status and error never reach the failure record)."""
    starter = getattr(_active, "starter", None)
    if starter is not None:
        starter.start_if_ready()


def note_error(message: str) -> None:
    """The one-line error this rank is about to exit with: the watchdog's failure record (the
    line every rank of the job prints) then names the reason, not only the exit status, whichever
    rank failed first."""
    _last_error.message = " ".join(str(message).split())[:500]


@contextlib.contextmanager
def watch_job():
    """Run the block under the job-wide watchdog (a no-op when disabled, single-rank, or nested)."""
    enabled, timeout_s, interval_s = settings_from_env()
    if not enabled or getattr(_active, "on", False):
        yield
        return
    _active.on = True
    starter = _active.starter = _Starter(timeout_s, interval_s)
    try:
        yield
    except SystemExit as e:
        wd = starter.close()
        if wd is not None and e.code not in (0, None):
            wd.on_exit_status(e.code)
        elif wd is not None:
            wd.finish()
        raise
    except BaseException as e:
        wd = starter.close()
        if wd is not None:
            wd.on_exception(e)
        raise
    else:
        wd = starter.close()
        if wd is not None:
            wd.finish()
    finally:
        _active.on = False
        _active.starter = None
