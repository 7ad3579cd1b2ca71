"""KV caches. Every cache implements both protocols of base.py — AttendingCache (a model that
attends itself) and GraphCache (a graph that attends) — over the common KVCache; the model never
knows which cache it has.

    base.py        the protocols, and KVState (a saved prompt)
    config.py      KVConfig: the budget, the tiers, prefetch
    contiguous.py  the exact cache: one growing buffer per layer
    tiered.py      the tiered cache's policy: chunking, budgets, selection
    window.py      a sliding-window layer's cache: its window, no tiers, no selection
    mixed.py       sliding layers apart, full-attention layers tiered (Gemma 3); budgeted_cache
    storage.py     where the tiered cache's tokens live: a slab in RAM, or chunks in tiers
    tiers.py       the tiers' placement: device copies over host/disk homes, by heat
    disk.py        the disk tier's file
    codec.py       a chunk's stored form at a bit width
    prefetch.py    the thread that reads likely chunks from disk ahead of use
    staging.py     a graph's views, changed only where the selection changes
    policy.py      decisions from measured attention (chunk sizes, shares, bit widths)
    stats.py       the tiered cache's counters and stats()
    store.py       the persistent prompt store (--kv-store)
"""

from edgetok.runtimes.kv.base import AttendingCache, GraphCache, KVCache, KVState
from edgetok.runtimes.kv.config import KVConfig
from edgetok.runtimes.kv.contiguous import ContiguousCache

__all__ = ["KVCache", "AttendingCache", "GraphCache", "KVState", "KVConfig", "ContiguousCache", "TieredCache",
           "MixedCache", "budgeted_cache"]

# The budgeted caches compute in torch: imported on first use, so the exact path runs without it.
_TORCH_CACHES = {"TieredCache": "edgetok.runtimes.kv.tiered", "MixedCache": "edgetok.runtimes.kv.mixed",
                 "budgeted_cache": "edgetok.runtimes.kv.mixed"}


def __getattr__(name: str):
    if name in _TORCH_CACHES:
        import importlib

        return getattr(importlib.import_module(_TORCH_CACHES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
