"""glibc malloc tuning for the server worker: freed decode buffers go back to the system.

Measured (tests/serve_utils.py corpus through preprocess(), 2 threads, 3 rounds): +82 MB of RSS
stayed with glibc's defaults, +1 MB with a fixed 1 MB mmap threshold. glibc serves a large block
with mmap and returns it at free(), but after the first free it raises its threshold to that block's
size, so the next image-sized buffers come from the heaps of its per-thread arenas, and those keep
the freed pages (the issue saw 1.16 GB stay allocated after four 16-bit PNGs). Fixing the threshold
(mallopt M_MMAP_THRESHOLD, which also stops the adjustment) costs an mmap/munmap pair per buffer of
1 MB or more: a few per decoded photo. No-op outside glibc (musl, macOS): RSS may then grow more.
"""
from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3


def return_large_blocks(threshold: int = 1 << 20) -> bool:
    """Allocations of `threshold` bytes or more use their own mmap, unmapped when freed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
    except (OSError, AttributeError):   # not glibc
        return False
