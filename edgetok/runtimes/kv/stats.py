"""What a tiered cache reports: its decode counters, and the stats() dict built from them."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgetok.runtimes.kv.config import KVConfig
    from edgetok.runtimes.kv.storage import Storage


class Counters(Counter):
    """Decode totals: counts, bytes, and seconds where the name ends in _s. Cleared when decode
    begins (prefill reads its blocks through the same paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.io_start: int | None = None  # the process's storage reads when decode began
        self.cpu_start = (0.0, 0.0)  # process and model-thread CPU seconds when decode began

    def mark_decode_start(self) -> None:
        """Where the process's storage reads and CPU time stand now (disk_report measures from here)."""
        self.io_start = process_read_bytes()
        self.cpu_start = (time.process_time(), time.thread_time())


def report(cfg: KVConfig, bits: str, storage: Storage) -> dict:
    """A tiered cache's stats(): what decode attended to and read, per step, and where chunks live."""
    c, layers = storage.counters, storage.layers
    steps = max(c["steps"], 1)
    return {
        "kind": storage.kind,
        # what a decode step's attention ran: the mixed-bit kernel (its instruction set) or the
        # reference; absent when a graph attends
        **({"attention": storage.attention} if storage.attention else {}),
        "budget": cfg.budget,
        "storage_bits": bits,
        "decode_steps": c["steps"],
        "budget_used": round(c["tokens_attended"] / max(c["tokens_total"], 1), 4),
        "tokens_attended_per_layer": round(c["tokens_attended"] / steps / len(layers), 1),
        "chunks_selected_per_step": round(c["chunks_selected"] / steps, 1),
        "bytes_read_per_token": {tier: round(n / steps) for tier, n in storage.bytes_read().items()},
        "prefetch_hits": c["prefetch_hits"],
        "sync_reads": c["sync_reads"],
        **storage.disk_stats(),
        "resident_bytes": storage.resident_bytes(),
        # a graph's native decode steps over slabs (mixed_attention.cpp: attend_slab): where their time went
        **({"native_ms_per_step": {part: round(c[f"native_{part}_s"] / steps * 1e3, 3) for part in ("select", "attend", "measure")}}
           if c["native_attend_s"] else {}),
        "chunk_sizes": [layer.chunk_size for layer in layers],
        "layer_spread": [round(layer.spread, 3) for layer in layers],
    }


def disk_report(c: Counters, uncached: bool) -> dict:
    """Decode totals of the disk tier's reads: how long the model thread waited for the disk
    (disk_wait_s: synchronous reads plus waits on unfinished prefetches), how long the prefetch
    thread read (prefetch_read_s: hidden behind compute unless waited on), and what the process
    read from storage devices (Linux /proc/self/io; small when the file sits in the page cache)."""
    io = process_read_bytes()
    return {
        # CPU seconds since decode began, all threads (the prefetch thread too) and the model's
        # thread (stats() runs on it): unlike wall time, not stretched by other processes.
        "decode_cpu_s": round(time.process_time() - c.cpu_start[0], 3),
        "decode_model_thread_cpu_s": round(time.thread_time() - c.cpu_start[1], 3),
        "disk_uncached": uncached,
        "disk_wait_s": round(c["sync_read_s"] + c["prefetch_wait_s"], 4),
        "sync_read_s": round(c["sync_read_s"], 4),
        "prefetch_wait_s": round(c["prefetch_wait_s"], 4),
        "prefetch_read_s": round(c["prefetch_read_s"], 4),
        "sync_disk_reads": c["sync_disk_reads"],
        "prefetch_chunks": c["prefetch_chunks"],
        "prefetch_unused": c["prefetch_unused"],
        "prefetch_unused_bytes": c["prefetch_unused_bytes"],
        "prefetch_paused_reads": c["prefetch_paused_reads"],  # synchronous disk reads after which prefetch was paused
        "process_read_bytes": None if io is None or c.io_start is None else io - c.io_start,
    }


def process_read_bytes() -> int | None:
    """Bytes this process has read from storage devices (not the page cache), where Linux says."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
