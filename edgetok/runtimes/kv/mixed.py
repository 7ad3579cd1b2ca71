"""A model with two kinds of layer (Gemma 3): sliding-window layers and full-attention layers.

Each layer's kind is the model's (ModelConfig.windows): a sliding layer keeps only its window
(window.py: no tiers, no selection, exact); the full-attention layers share one TieredCache, as a
model of only those layers (its layer j is the model's j-th full layer), budgeted and tiered. The
model and the backends see one cache through the same protocols as any other.
"""

from __future__ import annotations

import numpy as np
import torch

from edgetok.kernels.mixed_attention import StepTables
from edgetok.runtimes.kv.arrays import to_numpy, to_torch
from edgetok.runtimes.kv.base import AttendingCache, GraphCache, KVState
from edgetok.runtimes.kv.config import KVConfig
from edgetok.runtimes.kv.tiered import TieredCache
from edgetok.runtimes.kv.window import WindowLayer


class MixedCache(AttendingCache, GraphCache):
    def __init__(self, cfg: KVConfig, windows: list[int | None], num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype | None = None, reads: str = "kernel") -> None:
        """windows: per layer, its sliding window, or None for a full-attention layer; reads: what
        drives the full layers' TieredCache (its `reads`)."""
        full = [i for i, w in enumerate(windows) if w is None]
        assert full, "a model of sliding layers only has nothing to tier"
        self.full = TieredCache(cfg, len(full), num_heads, num_kv_heads, head_dim, dtype, reads)
        self.slot = {layer: j for j, layer in enumerate(full)}  # a full layer's index in self.full
        self.sliding = {i: WindowLayer(w, num_kv_heads, head_dim, self.full.dtype)
                        for i, w in enumerate(windows) if w is not None}

    # -- KVCache ---------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.full.length

    def skip(self, layer: int, n: int, kept: torch.Tensor) -> None:
        if layer in self.sliding:
            self.sliding[layer].skip(n, kept)
        else:
            self.full.skip(self.slot[layer], n, kept)

    def truncate(self, n: int) -> int:
        kept = self.full.truncate(n)
        if kept == n and all(layer.truncate(n) for layer in self.sliding.values()):
            return n
        self.full.truncate(0)  # a window that lost what position n needs: start over
        for layer in self.sliding.values():
            layer.reset()
        return 0

    def end_prefill(self) -> None:
        self.full.end_prefill()

    def close(self) -> None:
        self.full.close()

    def stats(self) -> dict:
        """The tiered cache's report (its budget and selection counters are the full layers'), with the
        sliding layers' windows counted in the device-resident bytes and reported apart."""
        window_bytes = sum(layer.nbytes() for layer in self.sliding.values())
        stats = self.full.stats()
        resident = dict(stats["resident_bytes"])
        resident["device"] = resident.get("device", 0) + window_bytes
        return stats | {"resident_bytes": resident,
                        "sliding_layers": {"count": len(self.sliding), "resident_bytes": window_bytes,
                                           "tokens_dropped": sum(x.dropped for x in self.sliding.values())}}

    @property
    def kv_dtype(self):
        return self.full.kv_dtype

    @property
    def state(self) -> KVState:
        """The full layers' prompt K/V and observation queries (the tiered cache's state), and each
        sliding layer's window: the last tokens it holds and the position of the first."""
        full = self.full.state
        layers, q_obs, starts, windows = [], [], [], []
        for i in range(len(self.slot) + len(self.sliding)):
            if i in self.sliding:
                layer = self.sliding[i]
                k, v, start = layer.held()
                layers.append((to_numpy(k), to_numpy(v)))  # (a saved state is numpy: the graph protocol)
                q_obs.append(None)
                starts.append(start)
                windows.append(layer.window)
            else:
                layers.append(full.layers[self.slot[i]])
                q_obs.append(full.q_obs[self.slot[i]] if full.q_obs else None)
                starts.append(0)
                windows.append(None)
        return KVState(layers, q_obs, starts, windows)

    @state.setter
    def state(self, state: KVState) -> None:
        starts = state.starts or [0] * len(state.layers)
        full = sorted(self.slot, key=self.slot.get)
        self.full.state = KVState([state.layers[i] for i in full],
                                  [state.q_obs[i] for i in full] if state.q_obs else None)
        for i, layer in self.sliding.items():
            k, v = state.layers[i]
            layer.load(to_torch(k), to_torch(v), starts[i])

    # -- AttendingCache --------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if layer in self.sliding:
            return self.sliding[layer].attend(q, k, v)
        return self.full.attend(self.slot[layer], q, k, v)

    def step_tables(self, t: int) -> StepTables | None:
        """TieredCache.step_tables for every layer: the full layers' tables from the tiered cache,
        each sliding layer's window as one row (a pruned prompt's windows mask by position: those
        steps attend per layer)."""
        if not self.full.tables_apply(t) or any(window.gaps for window in self.sliding.values()):
            return None
        tables = StepTables(len(self.slot) + len(self.sliding), self.full.n_kv, self.full.n_heads, self.full.head_dim,
                            self.full.dtype, t)
        self.full.fill_tables(tables, sorted(self.slot, key=self.slot.get))
        for i, window in self.sliding.items():
            tables.set(i, [window.table_row()])
        return tables

    def end_step_tables(self, tables: StepTables, k: list[np.ndarray], v: list[np.ndarray]) -> None:
        self.full.end_step_tables(tables, k, v)
        for i, window in self.sliding.items():
            window.append(to_torch(k[i]), to_torch(v[i]))

    # -- GraphCache ------------------------------------------------------------------------------
    @property
    def queries_read(self) -> int:
        return self.full.queries_read

    def view(self, layer: int, reserve: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
        if layer in self.sliding:
            k, v, p = self.sliding[layer].view(reserve)
            return to_numpy(k), to_numpy(v), p
        return self.full.view(self.slot[layer], reserve)

    def positions(self, layer: int) -> np.ndarray:
        if layer in self.sliding:
            return to_numpy(self.sliding[layer].positions())
        return self.full.positions(self.slot[layer])

    def append(self, layer: int, q: np.ndarray | None, k: np.ndarray, v: np.ndarray) -> None:
        if layer in self.sliding:  # (a graph's numpy arrays, shared as tensors)
            self.sliding[layer].append(to_torch(k), to_torch(v))
        else:
            self.full.append(self.slot[layer], q, k, v)

    def advance(self, layer: int, q: np.ndarray | None, n: int) -> None:
        if layer in self.sliding:
            self.sliding[layer].advance(n)
        else:
            self.full.advance(self.slot[layer], q, n)


def budgeted_cache(cfg: KVConfig, windows: list[int | None], num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype | None = None, reads: str = "kernel") -> TieredCache | MixedCache:
    """The cache for --kv-* options: tiered, with sliding layers apart when the model has both kinds
    (a model of sliding layers only tiers them all: its windows span the context it is run at)."""
    if any(w is not None for w in windows) and any(w is None for w in windows):
        return MixedCache(cfg, windows, num_heads, num_kv_heads, head_dim, dtype, reads)
    return TieredCache(cfg, len(windows), num_heads, num_kv_heads, head_dim, dtype, reads)
