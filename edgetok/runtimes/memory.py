"""Keep the process's RAM near what it uses: glibc otherwise keeps freed buffers in its heap.

glibc serves allocations above a threshold with mmap and returns them on free, but it raises that
threshold (up to 32 MB) each time such a buffer is freed; after that, the transient buffers of
prefill (attention scores, gathered K/V) come from the heap and stay in RSS. A budgeted KV cache is
pointless if freed memory never leaves, so it fixes the threshold and trims the heap after prefill.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        for symbol in ("mallopt", "malloc_trim"):  # glibc only: AttributeError elsewhere
            getattr(libc, symbol)
        return libc
    except (OSError, AttributeError, TypeError):
        return None


@functools.lru_cache(maxsize=1)
def return_large_buffers() -> bool:
    """Serve allocations of 1 MiB and more with mmap, always (no dynamic threshold)."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))


def trim_heap() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
