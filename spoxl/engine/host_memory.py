"""Host (CPU) memory: keep glibc from holding on to freed tensor memory.

A rank's resident memory is not what its live tensors need. glibc's malloc serves a freed large
block's pages to later requests only from the same heap, and its mmap threshold is dynamic: after
the first large blocks are freed it rises to 32 MiB, so every tensor under 32 MiB -- all of
ZeRO-3's per-module all-gather buffers, activations, reduce-scatter buckets -- then comes from
the heap, and the heap only grows as those blocks are freed in a different order than they were
taken. A fixed threshold (mallopt M_MMAP_THRESHOLD, which also turns the dynamic one off) makes
every allocation at or above it its own mmap, returned to the OS the moment it is freed; the price
is a page fault per page each time such a block is allocated again. Measured on the real-size SDXL
UNet (Diffusion-DPO, LoRA, ZeRO-3, 2 CPU ranks, 2 steps; docs/training.md#host-memory): glibc's
defaults 9.10 GB / 70.1 s per step, 16 MiB 7.98 GB / 69.7 s, 4 MiB 7.88 GB / 74.8 s, 1 MiB
6.31 GB / 85.3 s. 16 MiB, the recipe default (train.host_mmap_threshold_mib), costs nothing
measurable there; SPO peaked at 10.89 GB with glibc's defaults (over one fp32 UNet) and at
9.35 GB with 16 MiB.

  bound_host_heap(threshold_mib) -- fix glibc's mmap threshold at threshold_mib MiB (above).
      Returns whether it took effect (False off glibc).
  release_freed_memory() -- hand freed heap pages back to the OS now (malloc_trim), after a phase
      that frees GBs at once (building a model).
"""

from __future__ import annotations

import ctypes
import gc

from spoxl.config import MAX_HOST_MMAP_THRESHOLD_MIB

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def bound_host_heap(threshold_mib: float) -> bool:
    """Serve allocations of >= threshold_mib MiB by mmap (returned to the OS on free); see the module docstring."""
    if not 0 < threshold_mib <= MAX_HOST_MMAP_THRESHOLD_MIB:
        raise ValueError(f"host mmap threshold must be in (0, {MAX_HOST_MMAP_THRESHOLD_MIB}] MiB (glibc's range), "
                         f"got {threshold_mib}")
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_mib * 2**20)))


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc's malloc_trim; a no-op elsewhere). Building a large
    model frees GBs of temporaries that glibc would otherwise keep mapped, and that the next
    allocation spike (deepspeed.initialize, the first forward) then adds to."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
