"""glibc's memory allocator, set for the large, short-lived buffers of a training step or an
evaluation batch (the training loop and ``vitkit.cli.main`` for the commands that run a
checkpoint call ``keep_freed_memory``).

By default glibc serves every allocation above a threshold (128 KiB at first, raised as such
blocks are freed, up to 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and hands the
top of its heap back to the kernel when more than 128 KiB of it is free. A training step on the
CPU allocates and frees buffers of megabytes hundreds of times, so each step pays the kernel to
map, zero and fault in the same memory again: measured on 2 cores (docs/experiments.md, Where a
step's time goes), 20,000-80,000 page faults and 40-145 ms of system time a step.
``keep_freed_memory`` raises both thresholds, so freed buffers stay in the process and are
reused, as ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``
would before Python starts. The process then keeps its peak memory until it ends.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit (half its heap size)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, so the heap is never trimmed


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (``mallopt``); whether it did. False, and
    nothing changed, where the C library is not glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
