"""Test-wide settings: CPU DeepSpeed, offline hubs, Triton interpreter before any kernel import."""

import os
import socket


def _is_xdist_worker() -> bool:
    """Whether this process is a pytest-xdist worker (xdist sets the variable before the worker
    imports this file, so it also serves the module-level settings below)."""
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


# Must happen before anything imports triton-decorated modules (decoration-time choice).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`make test`: 2 workers on 2 cores, one of them often running a 2-rank launch)
# every process gets one intra-op thread: two spinning BLAS threads per process on a shared pair of
# cores make the tiny models' matmuls 10-20x slower. Set before torch is imported, and inherited by
# the launches the tests start.
if _is_xdist_worker():
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _deepspeed_shm_segments() -> set[str]:
    import glob

    return set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))


def pytest_sessionstart(session):
    session.config._shm_before = _deepspeed_shm_segments()


def pytest_sessionfinish(session):
    """Remove DeepSpeed CPU all-reduce /dev/shm segments that appeared during the run.

    spoxl skips that op (spoxl.engine.setup.skip_shared_memory_allreduce_op), but DeepSpeed never
    unlinks the segments when something does create them, and each holds RAM until reboot. Done by
    the controlling process only: an xdist worker that finishes first must not unlink a segment of
    a launch the other worker is still running.
    """
    if _is_xdist_worker():
        return
    for path in _deepspeed_shm_segments() - getattr(session.config, "_shm_before", set()):
        try:
            os.unlink(path)
        except OSError:
            pass


# Under xdist (`make test`: `-n 2 --dist loadfile`) a test module is the unit a worker takes, so
# module-scoped fixtures (the toy SPO runs, say) are built once. Modules whose tests start several
# rank processes hold one lock while they run (below): one multi-rank job at a time shares the two
# cores with one in-process test, and no launch's timeouts see a doubly loaded machine.
MULTI_PROCESS_MODULES = {"test_watchdog.py", "test_export_errors.py"}
# The order workers take modules in (`--no-loadscope-reorder`): the longest first, multi-rank and
# in-process modules alternating, so that the two workers rarely wait for the lock and no worker
# is left alone with a long module at the end.
FIRST_MODULES = ["test_engine_launcher.py", "test_toy_spo.py", "test_spo_launcher.py", "test_toy_offline.py",
                 "test_two_node_loopback.py", "test_lpo.py", "test_engine_errors.py", "test_cards.py",
                 "test_zero3_launcher.py", "test_toy_model.py", "test_watchdog.py", "test_export_errors.py"]  # fmt: skip


def _starts_ranks(item) -> bool:
    return item.get_closest_marker("launcher") is not None or item.path.name in MULTI_PROCESS_MODULES


def pytest_collection_modifyitems(config, items):
    """Orders the modules (FIRST_MODULES, then the collection order) and records which modules
    start rank processes. Without xdist this only orders the run."""
    config._multi_rank_modules = {item.path for item in items if _starts_ranks(item)}

    def rank(item) -> int:
        name = item.path.name
        return FIRST_MODULES.index(name) if name in FIRST_MODULES else len(FIRST_MODULES)

    items.sort(key=rank)  # stable: the order within a module is the collection order


@pytest.fixture(scope="module", autouse=True)
def _one_multi_rank_module_at_a_time(request, tmp_path_factory):
    """Under xdist, a module that starts rank processes runs holding a lock file shared by the
    workers (module-scoped, so it also covers module fixtures that launch)."""
    if not _is_xdist_worker() or request.node.path not in request.config._multi_rank_modules:
        yield
        return
    from filelock import FileLock

    with FileLock(str(tmp_path_factory.getbasetemp().parent / "multi-rank-modules.lock")):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_components():
    """The tiny SDXL components, built once per session (tests must not mutate them)."""
    from spoxl.models.loading import load_sdxl

    return load_sdxl("tiny")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_components):
    """The tiny SDXL saved as a diffusers folder, once per session."""
    path = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_components.save_pretrained(path)
    return path


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free TCP port on loopback for a launcher's master port (each launcher test gets its own).

    Chosen BELOW the kernel's ephemeral range: a port handed out by bind(0) is an ephemeral one,
    and in the seconds before the launcher binds it the machine's own outgoing connections (gloo
    peers of a concurrent run, for one) may take it; ports under the range are never given out
    that way. Random, so concurrent test processes rarely pick the same one; checked bindable.
    """
    import random

    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # fall back to the OS's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def master_port() -> int:
    return free_port()
