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


def free_port() -> int:
    """A free TCP port on loopback (each launcher test gets its own master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def master_port() -> int:
    return free_port()
