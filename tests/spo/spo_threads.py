"""Imported by the in-process SPO test modules (not a conftest.py: a second module named conftest
would shadow tests/conftest.py). SPO tests run on 2 shared cores: one intra-op thread per process avoids oversubscription
(the tiny model's matmuls are 10-20x slower with 2 spinning threads on a busy machine)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
