"""Let glibc keep freed memory for reuse, so large CPU tensors do not cost page faults on every step.

Bound propagation makes many short-lived activation-sized tensors. With glibc's defaults every
allocation above the (dynamic) mmap threshold is a fresh `mmap` and every free an `munmap`, so each new
tensor pays a page fault per 4 KiB page and the kernel zeroes it: on the 2-core machine of
docs/benchmarks.md an elementwise op on a 64 MiB tensor took 28 ms that way and 5 ms on reused memory, and a
certified training step got 25–30% faster. A GPU does not have this cost (PyTorch's CUDA allocator caches
blocks), so this makes the CPU behave like the GPU path rather than adding a separate one.

The cost: the process keeps its peak heap instead of returning it to the system between steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from glibc's malloc.h
_KEEP = 1 << 30  # allocations up to 1 GiB come from the heap; up to ~2 GiB of free heap top is kept

_applied = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process (Linux/glibc only). Returns whether the setting is in effect."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): keep the platform's allocator as it is
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, _KEEP)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * _KEEP - 1))
    return _applied
