"""Test-wide settings: CPU DeepSpeed, offline hubs, Triton interpreter before any kernel import."""

import os
import socket

# Must happen before anything imports triton-decorated modules (decoration-time choice).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _remove_leaked_deepspeed_shm():
    """Remove DeepSpeed CPU all-reduce /dev/shm segments that appeared during the session.

    spoxl skips that op (spoxl.engine.setup.skip_shared_memory_allreduce_op), but DeepSpeed never
    unlinks the segments when something does create them, and each holds RAM until reboot.
    """
    import glob

    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        try:
            os.unlink(path)
        except OSError:
            pass


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
