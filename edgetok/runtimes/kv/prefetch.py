"""Prefetch: a thread reads from disk the chunks a layer will likely select, while the model
computes the layer before it (or, for a graph, while the graph runs).

Consecutive queries are alike, so selections change little from step to step, and the chunks left
on disk are the ones at the margin of the selection, which come and go: the thread reads the
on-disk chunks a layer selected in any of its last `KVConfig.prefetch_steps` steps. It only reads
(no arithmetic), so it does not compete with the model for cores; the model thread decompresses.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from edgetok.runtimes.kv.stats import Counters
from edgetok.runtimes.kv.tiers import AT_DISK, TierStore

if TYPE_CHECKING:
    from edgetok.runtimes.kv.storage import HomedLayer


NEVER = -(1 << 40)  # selected_at of a chunk never selected


class Prefetcher:
    def __init__(self, store: TierStore, steps: int, counters: Counters, enabled: bool = True) -> None:
        """steps: how many past steps' selections predict a layer's next one; disabled: every read
        is synchronous (and no history is kept)."""
        self.store, self.steps, self.counters = store, steps, counters
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetok-kv-prefetch") if enabled else None
        self.pending: dict[int, Future] = {}  # layer → its read in flight
        self.selected_at = np.full(1024, NEVER, np.int64)  # chunk key → the last decode step that selected it

    def note_selected(self, keys: np.ndarray) -> None:
        """These chunks were selected at this step (what prefetch predicts from)."""
        if self.pool is not None and len(keys):
            self._cover(int(keys.max()))
            self.selected_at[keys] = self.counters["steps"]

    def _cover(self, key: int) -> None:
        """Room in selected_at for `key`."""
        if key >= len(self.selected_at):
            grow = max(key + 1, 2 * len(self.selected_at)) - len(self.selected_at)
            self.selected_at = np.concatenate([self.selected_at, np.full(grow, NEVER, np.int64)])

    def start(self, i: int, layer: HomedLayer, exclude: np.ndarray | None = None, next_step: bool = False) -> None:
        """Read the on-disk chunks layer i selected in its last `steps` steps (host and device
        chunks need no early read, nor `exclude`d ones). next_step: the layer's next read is at
        the next step (layer 0's is, and a graph's)."""
        if self.pool is None or layer.last_keys is None or i in self.pending:
            return
        step = self.counters["steps"] + (next_step or i == 0)
        keys = layer.keys
        if not len(keys):
            return
        self._cover(int(keys.max()))
        lately = (self.selected_at[keys] >= step - self.steps) & (self.store.where[keys] == AT_DISK)
        if exclude is not None:
            lately &= ~np.isin(keys, exclude)
        wanted = keys[lately].tolist()
        if wanted:
            self.pending[i] = self.pool.submit(self._read, wanted)

    def _read(self, keys: list[int]) -> tuple[dict, float]:
        """On the prefetch thread: the stored forms of `keys`, and the seconds the read took."""
        t0 = time.perf_counter()
        loaded = self.store.load_homes(keys)
        return loaded, time.perf_counter() - t0

    def take(self, i: int, keys: np.ndarray) -> dict:
        """What the prefetch thread read for layer i, of `keys` (waiting for it if unfinished)."""
        fut = self.pending.pop(i, None)
        if fut is None:
            return {}
        t0 = time.perf_counter()
        loaded, read_s = fut.result()
        c = self.counters
        c["prefetch_wait_s"] += time.perf_counter() - t0  # the read did not finish behind layer i-1's compute
        c["prefetch_read_s"] += read_s
        c["prefetch_chunks"] += len(loaded)
        read = np.fromiter(loaded, np.int64, len(loaded))
        wanted = np.isin(read, keys)
        unused = read[~wanted]
        c["prefetch_unused"] += len(unused)
        c["prefetch_unused_bytes"] += int(self.store.read_size[unused].sum())  # (a disk home's size, as read)
        return {k: loaded[k] for k in read[wanted].tolist()}

    def reset(self) -> None:
        """Cancel or finish every read in flight, and forget the selection history."""
        for fut in self.pending.values():
            fut.cancel()
            try:
                fut.result()
            except Exception:
                pass
        self.pending.clear()
        self.selected_at[:] = NEVER

    def close(self) -> None:
        self.reset()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
