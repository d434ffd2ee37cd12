"""The bounded host heap (spoxl.engine.host_memory): freed large tensors go back to the OS.

Each case runs in its own interpreter: mallopt is process-wide, and the bug it fixes (glibc's
dynamic mmap threshold, raised by the first large free) depends on the allocation history."""

import subprocess
import sys

import pytest

from spoxl.config import load_config
from spoxl.engine import host_memory

PROBE = r"""
import sys, torch
from spoxl.engine.host_memory import bound_host_heap

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

if sys.argv[1] == "bounded":  # the recipe default
    from spoxl.config import load_config
    assert bound_host_heap(load_config(None, []).train.host_mmap_threshold_mib)
# What a ZeRO-3 forward does to glibc: a large buffer freed (raising the dynamic threshold to its
# size), then many mid-size buffers (all-gathered modules) freed while a later one stays live.
big = torch.ones(24 * 2**20 // 4); del big  # under glibc's 32 MiB cap: raises the threshold to 24 MiB
blocks = [torch.ones(20 * 2**20 // 4) for _ in range(20)]  # 400 MiB in 20 MiB tensors
keep = torch.ones(20 * 2**20 // 4)  # a live block above them pins the heap's top
before = rss_mb()
del blocks
print(before - rss_mb())
"""


def _returned_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._libc() is None, reason="glibc only")
def test_freed_tensors_return_to_the_os_only_with_the_bounded_heap():
    # The control shows the probe can fail: glibc's defaults keep the freed 400 MiB mapped.
    assert _returned_mib("default") < 100
    assert _returned_mib("bounded") > 350


def test_threshold_outside_glibcs_range_is_refused():
    for bad in (0, -1, 33):
        with pytest.raises(ValueError, match=r"\(0, 32\] MiB"):
            host_memory.bound_host_heap(bad)


def test_build_training_bounds_the_heap_with_the_recipes_threshold(tmp_path, monkeypatch):
    from tests.engine.inprocess import make

    seen = []
    monkeypatch.setattr(host_memory, "bound_host_heap", lambda mib: seen.append(mib) or True)
    assert load_config(None, []).train.host_mmap_threshold_mib == 16.0  # on by default
    make(tmp_path, ["train.host_mmap_threshold_mib=2.5", "train.max_steps=1"])
    assert seen == [2.5]
    make(tmp_path / "off", ["train.host_mmap_threshold_mib=null", "train.max_steps=1"])
    assert seen == [2.5]  # null: glibc's defaults, no call


def test_a_threshold_the_c_library_cannot_apply_is_reported(tmp_path, monkeypatch, capsys):
    from tests.engine.inprocess import make

    monkeypatch.setattr(host_memory, "_libc", lambda: None)  # not glibc: mallopt unavailable
    make(tmp_path, ["train.host_mmap_threshold_mib=8", "train.max_steps=1"])
    assert "train.host_mmap_threshold_mib=8.0 not applied" in capsys.readouterr().err


def test_offloaded_text_encoders_visit_the_device_only_while_encoding(tiny_components, monkeypatch):
    """model.offload_text_encoders: each encode moves both encoders to the compute device, encodes,
    and moves them home to the CPU -- in that order, also when encoding fails -- with the same
    embeddings as resident encoders. The moves are recorded against a device this machine lacks."""
    import torch

    from spoxl.models.text import encode_prompts

    resident = encode_prompts(tiny_components, ["a red circle"])
    events = []
    for name in ("text_encoder", "text_encoder_2"):
        part = getattr(tiny_components, name)
        monkeypatch.setattr(part, "to", lambda device, _n=name: events.append((_n, str(device))))
        original = part.forward
        monkeypatch.setattr(part, "forward", lambda *a, _n=name, _o=original, **k: events.append((_n, "encode")) or _o(*a, **k))
    monkeypatch.setattr(tiny_components, "text_encoder_device", torch.device("cuda", 3), raising=False)
    offloaded = encode_prompts(tiny_components, ["a red circle"])
    assert events == [("text_encoder", "cuda:3"), ("text_encoder_2", "cuda:3"), ("text_encoder", "encode"),
                      ("text_encoder_2", "encode"), ("text_encoder", "cpu"), ("text_encoder_2", "cpu")]
    assert torch.equal(offloaded.embeds, resident.embeds) and torch.equal(offloaded.pooled, resident.pooled)
    events.clear()
    monkeypatch.setattr(tiny_components.text_encoder, "forward", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        encode_prompts(tiny_components, ["a red circle"])
    assert events[-2:] == [("text_encoder", "cpu"), ("text_encoder_2", "cpu")]  # home even on failure


def test_build_training_offloads_the_text_encoders_when_asked(tmp_path):
    from tests.engine.inprocess import make

    ctx, _ = make(tmp_path, ["model.offload_text_encoders=true", "train.max_steps=1"])
    assert ctx.components.text_encoder_device == ctx.device
    assert next(ctx.components.text_encoder_2.parameters()).device.type == "cpu"
    plain, _ = make(tmp_path / "plain", ["train.max_steps=1"])
    assert plain.components.text_encoder_device is None
