"""Prefetch: a thread reads from disk the chunks a layer will likely select, while the model
computes the layer before it (or, for a graph, while the graph runs).

Consecutive queries are alike, so selections change little from step to step, and the chunks left
on disk are the ones at the margin of the selection, which come and go: the thread reads the
on-disk chunks a layer selected in any of its last `KVConfig.prefetch_steps` steps. It only reads
(no arithmetic); the model thread decompresses.

It pays only when a read waits for the storage device. A read from the page cache is a copy plus
Python, work the thread would only move onto the cores the model computes on, and the model
then waits for the interpreter lock instead of the disk (BENCHMARKS.md: 8K over tiers, 19.2–19.4
ms a token without prefetch against 20.4–21.4 with it, the file in the page cache). So the
model thread times its own disk reads: while most of their time is CPU, not waiting, prefetch
pauses (its history is still kept), and it resumes when reads wait again.
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
# Prefetch runs while this share of a synchronous disk read's time is waiting (not the model
# thread's CPU), averaged over reads; two thresholds, so that it does not flip on every step.
WAITING_ON, WAITING_OFF = 0.5, 0.3


class Prefetcher:
    def __init__(self, store: TierStore, steps: int, counters: Counters, mode: str = "auto") -> None:
        """steps: how many past steps' selections predict a layer's next one; mode (KVConfig.prefetch):
        auto, on, or off (every read is synchronous, and no history is kept)."""
        self.store, self.steps, self.counters, self.mode = store, steps, counters, mode
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetok-kv-prefetch") if mode != "off" else None
        self.pending: dict[int, Future] = {}  # layer → its read in flight
        self.waiting = 1.0  # of the model thread's disk reads' time (its running average): on at first
        self.active = mode != "off"
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
        if not self.active or layer.last_keys is None or i in self.pending:
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

    def read_now(self, keys: list[int]) -> dict:
        """The stored forms of `keys` read on the model thread (some on disk): the read's time
        counts as waited for, and what share of it was waiting decides whether prefetch runs."""
        wall, cpu = time.perf_counter(), time.thread_time()
        loaded = self.store.load_homes(keys)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        self.counters["sync_read_s"] += wall
        self.observe(wall, cpu)
        return loaded

    def observe(self, wall_s: float, cpu_s: float) -> None:
        """A synchronous disk read took wall_s seconds, cpu_s of them the model thread's CPU: under
        auto, prefetch pauses or resumes by the average share of such reads' time spent waiting."""
        if self.mode != "auto" or wall_s <= 0:
            return
        self.waiting = 0.8 * self.waiting + 0.2 * max(0.0, 1.0 - cpu_s / wall_s)
        self.active = self.waiting >= (WAITING_OFF if self.active else WAITING_ON)
        self.counters["prefetch_paused_reads"] += not self.active

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
        wanted = set(keys.tolist())
        used = {k: form for k, form in loaded.items() if k in wanted}
        unused = [k for k in loaded if k not in wanted]
        c["prefetch_unused"] += len(unused)
        c["prefetch_unused_bytes"] += int(self.store.read_size[unused].sum())  # (a disk home's size, as read)
        return used

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
