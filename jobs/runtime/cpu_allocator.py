"""Keep freed CPU memory in the process instead of handing it back to the OS (glibc only).

Why: PyTorch has no caching allocator on the CPU. glibc serves big tensors with fresh mmap()s
and returns freed ones at once, so every new big tensor is page-faulted in again, zero-filled by
the kernel. For the batched region scorer (a few tensors of 10-100 MB per call, freed and
re-made thousands of times) that system time cost more than batching saved: with the default
allocator the scorer had to keep calls to one 512 px pair (16 MB). Raising glibc's mmap and trim
thresholds makes freed blocks reusable, and a call can then hold a whole chunk of pairs.

The cost is that a process keeps its high-water mark of heap memory until it exits, which is what
a long-lived scoring actor wants anyway. It is a process-wide setting, so it is opt-in: scoring
actors call it in their constructor; library callers decide for themselves.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

from fbmem.jobs.core.region_similarity import CPU_BLOCK_BYTES, CPU_BLOCK_BYTES_RETAINED

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1

_retaining = False


def retain_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
    """Serve allocations below `mmap_threshold` from the heap and never trim it; True if applied.

    Returns False (and changes nothing) where the C library is not glibc, e.g. on macOS or musl.
    """
    global _retaining
    if _retaining:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("C library has no mallopt: freed CPU memory goes back to the OS (slower scoring)")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, _INT_MAX)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1 and ok
    _retaining = ok
    return ok


def retains_freed_memory() -> bool:
    """Whether retain_freed_memory() took effect in this process."""
    return _retaining


def default_cpu_block_bytes() -> int:
    """The region scorer's CPU block for this process: large only when freed memory is kept."""
    return CPU_BLOCK_BYTES_RETAINED if retains_freed_memory() else CPU_BLOCK_BYTES
