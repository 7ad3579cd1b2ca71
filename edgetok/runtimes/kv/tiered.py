"""The tiered KV cache (after LeoAM): chunks, key abstracts, budgeted selection, tiers, prefetch.

Prefill attends exactly. `end_prefill` measures every layer's attention skew with the last prompt
queries and sets, per layer, the chunk size (small where attention is concentrated) and the share
of the token budget (large where it is spread). Each decode step, per layer, attention reads the
sink chunk(s), the recent chunks, the not-yet-chunked window, and the chunks whose key abstracts
(per-chunk min/max of the keys) bound q·k highest — up to the layer's budget.

Where chunks live depends on the config:
- resident (no tier budgets): every token's K/V stays in one float slab per layer, the device
  tier; a selection is one index_select;
- tiered (--kv-device-mb / --kv-host-mb / --kv-disk / --kv-bits): each chunk has a home in host
  RAM or on disk, stored at a bit width chosen by its importance; the device tier caches float
  copies of the chunks attention reads; a background thread reads layer i+1's likely chunks while
  layer i computes.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from edgetok.kernels.attention import attend, causal_mask
from edgetok.kernels.selection import key_abstracts, select_chunks
from edgetok.runtimes.kv.codec import decode_many, encode
from edgetok.runtimes.kv.config import KVConfig
from edgetok.runtimes.kv.policy import allocate, attention_profile, bits_by_importance, chunk_size_for, layer_shares
from edgetok.runtimes.kv.staging import LayerKV, Stages, slab_chunks
from edgetok.runtimes.kv.tiers import DEVICE, DISK, HOST, TierStore
from edgetok.runtimes.memory import return_large_buffers, trim_heap

MB = 1 << 20
DECODE_CHUNK_BITS = 8  # chunks sealed during decode, under --kv-bits auto
# Prefetch reads a layer's on-disk chunks that it selected in any of its last PREFETCH_STEPS steps.
# The chunks left on disk are the ones at the margin of the selection, which come and go. At 8K
# (SmolLM2, 25 %, 16 MB device + 64 MB host, disk reads past the page cache; benchmarks/kv_prefetch.py)
# the last 1 / 3 / 8 steps predicted 53 / 70 / 84 % of the disk chunks read, and the model thread
# waited 6.8 / 4.6 / 5.2 ms per token for the disk (12.3 without prefetch): 8 steps read 2.9 MB per
# token in vain and came late more often. EDGETOK_KV_PREFETCH_STEPS overrides it (benchmarks).
PREFETCH_STEPS = 3


@dataclass
class Layer:
    chunk_size: int = 0  # 0 while prefilling
    share: float = 1.0  # of the average token budget
    spread: float = 1.0
    n_chunks: int = 0  # chunks sealed; their abstracts are TieredCache.abstracts[layer, ..., :n_chunks]
    q_obs: torch.Tensor | None = None  # (Hq, ≤W, D) the last prompt queries
    last_keys: list[int] | None = None  # the chunks read at the previous step: predicts the next ones
    q_last: torch.Tensor | None = None  # (Hq, D) the last query: selects a graph's next view
    # resident: all tokens, chunks first then the window, in a growing slab
    slab_k: torch.Tensor | None = None  # (Hkv, capacity, D)
    slab_v: torch.Tensor | None = None
    n: int = 0  # tokens in the slab
    # tiered: chunk ids in the TierStore, and the window of recent tokens
    keys: list[int] = field(default_factory=list)
    window_k: torch.Tensor | None = None  # (Hkv, w, D)
    window_v: torch.Tensor | None = None


class TieredCache:
    @property
    def queries_read(self) -> int:
        """The last prompt queries measure each layer's skew; in decode the last one selects."""
        return max(1, self.cfg.observation_window)

    def __init__(
        self, cfg: KVConfig, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        """dtype: of the K/V attention reads (default: bf16 when approximate, float32 when exact)."""
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layers = [Layer() for _ in range(num_layers)]
        self.lengths = [0] * num_layers  # tokens stored per layer
        self.skipped = [0] * num_layers  # positions a layer never stores (pruned prompt tokens)
        self.resident = not cfg.needs_homes
        self._slab_unit = math.lcm(*cfg.chunk_sizes)
        self.bits = cfg.storage_bits()
        # Approximate attention reads bf16 K/V (half the bytes: the decode cost at long contexts);
        # an exact cache keeps float32.
        self.dtype = dtype or (torch.float32 if self.bits == "32" else torch.bfloat16)
        self.store: TierStore | None = None
        self.pool: ThreadPoolExecutor | None = None
        if not self.resident:
            device = 0 if cfg.device_mb is None else int(cfg.device_mb * MB)  # no budget: decompress per read
            host = None if cfg.host_mb is None else int(cfg.host_mb * MB)
            self.store = TierStore(device, host, cfg.disk_dir, functools.partial(decode_many, dtype=self.dtype),
                                   disk_uncached=cfg.disk_uncached)
            return_large_buffers()
            if cfg.prefetch:
                self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetok-kv-prefetch")
        # (L, Hkv, 2D, capacity): per layer, the max then min keys of each chunk, float32 (bounds are
        # computed from them every step)
        self.abstracts = torch.zeros(num_layers, num_kv_heads, 2 * head_dim, 0)
        self.stages = Stages(num_layers, num_kv_heads, head_dim, self.dtype)  # a graph's resident views
        self._views: list[tuple] = []  # this decode step's view of each layer (a graph's backend)
        self._next_key = 0
        self.prefetch: dict[int, Future] = {}
        self.prefetch_steps = int(os.environ.get("EDGETOK_KV_PREFETCH_STEPS", PREFETCH_STEPS))
        self._selected_at: dict[int, int] = {}  # chunk key → the last decode step that selected it
        self.budgets: list[float] = []
        self.counters = Counter()  # decode totals (counts, bytes, and seconds where the name ends in _s)
        self._io_start: int | None = None  # the process's storage reads when decode began
        self._cpu_start = (0.0, 0.0)  # process and model-thread CPU seconds when decode began

    # -- the KVCache protocol --------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.lengths[-1] + self.skipped[-1]

    def skip(self, layer: int, n: int) -> None:
        self.skipped[layer] += n

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert q.shape[0] == 1, "the tiered cache holds one sequence"
        self.lengths[layer] += k.shape[2]
        q, k, v = q[0], k[0], v[0]
        if self.layers[layer].chunk_size == 0:
            out = self._attend_prefill(layer, q, k, v)
        else:
            out = self._attend_decode(layer, q, k, v)
        return out[None]

    def truncate(self, n: int) -> int:
        """Only a whole reset: chunk sizes and budgets were fitted to the old prompt."""
        if n >= self.length:
            return self.length
        self.reset()
        return 0

    def reset(self) -> None:
        self._drain_prefetch()
        if self.store is not None:
            for layer in self.layers:
                for key in layer.keys:
                    self.store.drop(key)
        self.layers = [Layer() for _ in self.layers]
        self.abstracts = torch.zeros(self.abstracts.shape[:3] + (0,))  # (no view: reset runs in __del__ too)
        self.stages.reset()
        self._views = []
        self._selected_at.clear()
        self.lengths = [0] * len(self.lengths)
        self.skipped = [0] * len(self.skipped)
        self.counters.clear()

    def close(self) -> None:
        self.reset()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        if self.store is not None:
            self.store.close()

    def __del__(self) -> None:  # the disk file must not outlive the cache
        try:
            self.close()
        except Exception:
            pass

    # -- resident storage ------------------------------------------------------------------------
    def _slab_grow(self, layer: Layer, needed: int) -> None:
        """Room in the slab for `needed` tokens (a quarter more each time it grows)."""
        if layer.slab_k is not None and needed <= layer.slab_k.shape[1]:
            return
        cap = max(256, needed + 256, needed * 5 // 4)
        cap = -(-cap // self._slab_unit) * self._slab_unit  # whole chunks: a slab views as (Hkv, chunks, S·D)
        shape = (self.n_kv, cap, self.head_dim)
        # Zeros, not garbage: a graph reads the whole slab in prefill and masks the spare slots
        # (a NaN there would survive the mask).
        new_k, new_v = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        if layer.n:
            new_k[:, : layer.n], new_v[:, : layer.n] = layer.slab_k[:, : layer.n], layer.slab_v[:, : layer.n]
        layer.slab_k, layer.slab_v = new_k, new_v

    def _slab_append(self, layer: Layer, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[1]
        self._slab_grow(layer, layer.n + t)
        for slab, new in ((layer.slab_k, k), (layer.slab_v, v)):
            dst = slab[:, layer.n : layer.n + t]
            if dst.data_ptr() != new.data_ptr():  # a graph may have written them in place
                dst.copy_(new)
        layer.n += t

    # -- tiered storage --------------------------------------------------------------------------
    def _store_chunk(self, k: torch.Tensor, v: torch.Tensor, bits: int, heat: float) -> int:
        self._next_key += 1
        tensors, meta = encode(k, v, bits)
        self.store.add(self._next_key, tensors, meta, heat)
        return self._next_key

    def _fetch(self, keys: list[int], prefetched: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Float K/V of `keys`, counting where each came from; chunks read from below may move up."""
        prefetched = prefetched or {}
        tiers = [self.store.tier_of(k) for k in keys]
        missing = [k for k, t in zip(keys, tiers) if t != DEVICE and k not in prefetched]
        from_disk = sum(1 for k, t in zip(keys, tiers) if t == DISK and k not in prefetched)
        loaded = dict(prefetched)
        if missing:
            t0 = time.perf_counter()
            loaded.update(self.store.load_homes(missing))
            if from_disk:  # the main thread waits for the disk (host homes are a dict lookup)
                self.counters["sync_read_s"] += time.perf_counter() - t0
        loaded = self.store.decompress_loaded(loaded)
        self.counters["sync_reads"] += len(missing)
        self.counters["sync_disk_reads"] += from_disk
        self.counters["prefetch_hits"] += len(keys) - len(missing) - tiers.count(DEVICE)
        self.store.account(keys, tiers)
        out = [self.store.device[key] if tier == DEVICE else loaded[key] for key, tier in zip(keys, tiers)]
        # Admission compares heats before this read counts, so this layer's chunks do not look
        # hotter than the other layers' just because they were read last.
        self.store.put_device({key: loaded[key] for key, tier in zip(keys, tiers) if tier != DEVICE})
        self.store.touch(keys)
        return out

    def _layer_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All of layer i's tokens, in order, as float (Hkv, N, D)."""
        layer = self.layers[i]
        if self.resident:
            return layer.slab_k[:, : layer.n], layer.slab_v[:, : layer.n]
        parts = self._fetch(layer.keys) if layer.keys else []
        if layer.window_k is not None:
            parts.append((layer.window_k, layer.window_v))
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    # -- prefill: exact ---------------------------------------------------------------------------
    def _attend_prefill(self, i: int, q, k, v) -> torch.Tensor:
        layer = self.layers[i]
        past = None if self.resident or not layer.keys else self._layer_kv(i)  # before this piece is stored
        self._prefill_store(i, q, k, v)
        if self.resident:
            keys, values = self._layer_kv(i)
        else:
            k, v = k.to(self.dtype), v.to(self.dtype)
            keys, values = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))
        return self._attend(q, keys, values, k.shape[1])

    def _prefill_store(self, i: int, q, k, v) -> None:
        layer = self.layers[i]
        if self.resident:
            self._slab_append(layer, k, v)
        else:  # provisional: one block per piece, until end_prefill cuts chunks
            layer.keys.append(self._store_chunk(k.to(self.dtype), v.to(self.dtype), 32, heat=0.0))
        w = self.cfg.observation_window
        layer.q_obs = q[:, -w:] if layer.q_obs is None else torch.cat([layer.q_obs, q], 1)[:, -w:]

    @staticmethod
    def _attend(q, keys, values, t: int) -> torch.Tensor:
        """q (Hq, T, D) over keys/values (Hkv, S, D), in the storage dtype; float32 out."""
        out = attend(q[None].to(keys.dtype), keys[None], values[None], causal_mask(t, keys.shape[1]))[0]
        return out.float()

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.dtype

    def ingest(self, layers, q_obs=None) -> None:
        """Take stored K/V ((Hkv, N, D) per layer) as this cache's first N prompt tokens."""
        assert self.length == 0
        for i, (k, v) in enumerate(layers):
            layer = self.layers[i]
            if self.resident:
                self._slab_append(layer, k.to(self.dtype), v.to(self.dtype))
            else:
                layer.keys.append(self._store_chunk(k.float(), v.float(), 32, heat=0.0))
            layer.q_obs = q_obs[i] if q_obs else None
            self.lengths[i] = k.shape[1]

    def export(self):
        """Every layer's prompt K/V (before end_prefill) and its last prompt queries."""
        assert self.layers[0].chunk_size == 0, "export the prompt before end_prefill"
        assert not any(self.skipped), "a pruned prompt's K/V is not a prefix anyone can reuse"
        return [self._layer_kv(i) for i in range(len(self.layers))], [layer.q_obs for layer in self.layers]

    def end_prefill(self) -> None:
        """Fit chunk sizes, budgets and bit widths to the prompt's measured attention."""
        if self.length == 0 or self.layers[0].chunk_size:
            return
        spreads = []
        for i, layer in enumerate(self.layers):
            keys, values = self._layer_kv(i)
            profile = attention_profile(layer.q_obs.float(), keys.float())
            layer.spread, layer.q_obs = profile.spread, None
            layer.chunk_size = chunk_size_for(profile.spread, self.cfg.chunk_sizes)
            spreads.append(profile.spread)
            self._chunk(i, keys, values, profile.importance)
        for layer, share in zip(self.layers, layer_shares(spreads)):
            layer.share = share
        self.counters.clear()  # the counters report decode (prefill read its blocks through _fetch too)
        if self.store is not None:
            self.store.read_bytes.clear()
            self.store.read_chunks.clear()
            self._io_start = _process_read_bytes()
            self._cpu_start = (time.process_time(), time.thread_time())
            trim_heap()

    def _chunk(self, i: int, keys: torch.Tensor, values: torch.Tensor, importance: torch.Tensor) -> None:
        layer = self.layers[i]
        size, n = layer.chunk_size, keys.shape[1]
        c = n // size
        self._add_abstracts(i, keys[:, : c * size].reshape(self.n_kv, c, size, self.head_dim))
        if self.resident:
            return
        for key in layer.keys:  # the provisional prefill blocks
            self.store.drop(key)
        imp = importance[: c * size].view(c, size).sum(1).tolist()
        bits = [32] * c if self.bits == "32" else bits_by_importance(imp, self.bits)
        layer.keys = []
        for j in range(c):
            sl = slice(j * size, (j + 1) * size)
            b = 16 if (j * size < self.cfg.sink_tokens and self.bits == "auto") else bits[j]  # sinks stay sharp
            layer.keys.append(self._store_chunk(keys[:, sl], values[:, sl], b, heat=imp[j] * 10))
        layer.window_k, layer.window_v = keys[:, c * size :].clone(), values[:, c * size :].clone()

    def _add_abstracts(self, i: int, chunks: torch.Tensor) -> None:
        """chunks (Hkv, C, S, D): layer i's next C chunks."""
        layer, c = self.layers[i], chunks.shape[1]
        need = layer.n_chunks + c
        if need > self.abstracts.shape[3]:
            grown = torch.zeros(self.abstracts.shape[:3] + (max(need + 64, need * 5 // 4),))
            grown[..., : self.abstracts.shape[3]] = self.abstracts
            self.abstracts = grown
        self.abstracts[i, :, :, layer.n_chunks : need] = key_abstracts(chunks)
        layer.n_chunks = need

    # -- decode: budgeted -------------------------------------------------------------------------
    def _window_len(self, layer: Layer) -> int:
        if self.resident:
            return layer.n - layer.n_chunks * layer.chunk_size
        return layer.window_k.shape[1]

    def _plan(self, i: int) -> tuple[int, int, int] | None:
        """How many of layer i's chunks it attends to this step, and how many of them are forced
        (sinks, recent): (keep, sinks, recent); None = all of them."""
        layer = self.layers[i]
        c, size, window = layer.n_chunks, layer.chunk_size, self._window_len(layer)
        budget = self.budgets[i] if self.budgets else float("inf")
        if self.cfg.full_budget or c == 0 or budget >= c * size + window:
            return None
        sinks = min(c, -(-self.cfg.sink_tokens // size))
        recent = min(c, max(0, -(-(self.cfg.recent_tokens - window) // size)))
        return min(c, max(int((budget - window) // size), sinks + recent)), sinks, recent

    def _select(self, i: int, q: torch.Tensor) -> torch.Tensor | None:
        """Chunk indices (sorted) layer i attends to for query q (Hq, D); None = all of them."""
        plan = self._plan(i)
        if plan is None:
            return None
        keep = plan[0]
        args = [torch.tensor([x]) for x in (self.layers[i].n_chunks, *plan)]
        chosen, _ = select_chunks(q[None], self.abstracts[i : i + 1, :, :, : self.layers[i].n_chunks], *args)
        return chosen[0, :keep].sort().values

    def _select_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's chunks for this step, chosen at once with each layer's last query:
        chunk ids (L, K) and which of them count (L, K) (a layer whose budget covers all of its
        chunks keeps them all)."""
        plans = [self._plan(i) for i in range(len(self.layers))]
        counts = [layer.n_chunks for layer in self.layers]
        rows = [(c, c, 0, 0) if plan is None else (c, *plan) for c, plan in zip(counts, plans)]
        counts_t, keep, sinks, recent = torch.tensor(rows).T
        q = torch.stack([layer.q_last for layer in self.layers])  # (L, Hq, D)
        return select_chunks(q, self.abstracts[:, :, :, : max(counts)], counts_t, keep, sinks, recent)

    def _step_budgets(self) -> None:
        """Per-layer budgets for this step: the average budget spread by the layers' shares."""
        total = [layer.n_chunks * layer.chunk_size + self._window_len(layer) for layer in self.layers]
        self.budgets = allocate([layer.share for layer in self.layers], self.cfg.budget_tokens(self.length), total)

    def _begin_step(self) -> None:
        self.counters["steps"] += 1
        if self.store is not None:
            self.store.step += 1
        self._step_budgets()

    def _attend_decode(self, i: int, q, k, v) -> torch.Tensor:
        if i == 0:
            self._begin_step()
        chosen = self._select(i, q[:, -1])
        self._decode_store(self.layers[i], k, v)
        keys, values = self._decode_gather(i, chosen)
        out = self._attend(q, keys, values, k.shape[1])
        self._maybe_seal(i)
        return out

    def _decode_store(self, layer: Layer, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.resident:
            self._slab_append(layer, k, v)
        else:
            k, v = k.to(self.dtype), v.to(self.dtype)
            layer.window_k, layer.window_v = torch.cat([layer.window_k, k], 1), torch.cat([layer.window_v, v], 1)

    def _decode_gather(self, i: int, chosen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[i]
        keys, values = self._gather_resident(layer, chosen) if self.resident else self._gather_tiered(i, chosen)
        self._count(layer, layer.n_chunks if chosen is None else len(chosen), keys.shape[1])
        return keys, values

    def _count(self, layer: Layer, chunks: int, attended: int) -> None:
        self.counters["tokens_attended"] += attended
        self.counters["tokens_total"] += layer.n_chunks * layer.chunk_size + self._window_len(layer)
        self.counters["chunks_selected"] += chunks

    def _maybe_seal(self, i: int) -> None:
        layer = self.layers[i]
        if self._window_len(layer) >= 2 * layer.chunk_size:  # keep ≥ one chunk of exact recent tokens
            self._seal(i)

    # -- for a whole-model graph (the ONNX backend), which attends itself --------------------------
    def view(self, i: int, reserve: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What layer i's next tokens attend to besides themselves: keys, values (1, Hkv, S, D) of
        which the first P slots count, and P. Prefill: every stored token. Decode: the chunks each
        layer's last query selects (consecutive queries are alike), chosen for all layers when
        layer 0 asks, and the window. In RAM the buffers have room for `reserve` more tokens after
        the P (a graph may write them there)."""
        layer = self.layers[i]
        if layer.chunk_size == 0:
            if self.resident:  # the slab itself, with room
                self._slab_grow(layer, layer.n + reserve)
                return layer.slab_k[None], layer.slab_v[None], layer.n
            if self.lengths[i] == 0:
                empty = torch.zeros(self.n_kv, 0, self.head_dim, dtype=self.dtype)
                keys, values = empty, empty
            else:
                keys, values = self._layer_kv(i)
            return keys[None], values[None], keys.shape[1]
        if i == 0:
            self._begin_step()
            self._views = self._graph_views(reserve)
        return self._views[i]

    def _graph_views(self, reserve: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """This step's view of every layer, staged: only the chunks that enter a layer's selection
        are fetched (from the slab, or from the tiers) and copied."""
        chosen, valid = self._select_all()
        views = self.stages.update([self._stage_source(i) for i in range(len(self.layers))], chosen, valid, reserve)
        kept = valid.sum(1).tolist()
        for layer, (k, _, p), n in zip(self.layers, views, kept):
            if self.resident:
                self.counters["bytes_device"] += 2 * p * self.n_kv * self.head_dim * k.element_size()
            self._count(layer, n, p)
        if not self.resident:
            self._after_staging(chosen, kept)
        return views

    def _stage_source(self, i: int) -> LayerKV:
        layer = self.layers[i]
        if self.resident:
            start = layer.n_chunks * layer.chunk_size
            chunks = slab_chunks(layer.slab_k, layer.slab_v, layer.chunk_size)
            return LayerKV(layer.chunk_size, layer.n_chunks, chunks, layer.slab_k[:, start : layer.n], layer.slab_v[:, start : layer.n])
        return LayerKV(layer.chunk_size, layer.n_chunks, functools.partial(self._chunk_rows, i), layer.window_k, layer.window_v)

    def _chunk_rows(self, i: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's chunks `ids` from the tiers: K, V (Hkv, n, S·D)."""
        keys = [self.layers[i].keys[c] for c in ids.tolist()]
        kv = self._fetch(keys, self._take_prefetch(i, keys))
        return tuple(torch.stack([t[j] for t in kv], 1).view(self.n_kv, len(keys), -1) for j in (0, 1))

    def _after_staging(self, chosen: torch.Tensor, kept: list[int]) -> None:
        """The tiers' bookkeeping of a staged step: every selected chunk was used (heat; those that
        stayed staged were not fetched, so not touched yet), and the prefetch thread reads, while
        the graph runs, the on-disk chunks the layers selected lately but hold no more."""
        for i, (row, n, incoming) in enumerate(zip(chosen.tolist(), kept, self.stages.incoming)):
            layer = self.layers[i]
            selected = [layer.keys[c] for c in row[:n]]
            fetched = {layer.keys[c] for c in incoming.tolist()}
            self.store.touch([k for k in selected if k not in fetched])
            self._note_selected(selected)
            layer.last_keys = selected
            self._start_prefetch(i, exclude=set(selected), next_step=True)

    def append(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' k, v (1, Hkv, T, D); their queries q (1, Hq, T, D) steer selection."""
        assert q.shape[0] == 1, "the tiered cache holds one sequence"
        layer = self.layers[i]
        self.lengths[i] += k.shape[2]
        q, k, v = q[0], k[0], v[0]
        layer.q_last = q[:, -1]
        if layer.chunk_size == 0:
            self._prefill_store(i, q, k, v)
            return
        if self._views:
            staged_k, _, p = self._views[i]
            if k.data_ptr() == staged_k[0, :, p:].data_ptr():  # the graph wrote them after the window
                self.stages.wrote(i, k.shape[1])
        self._decode_store(layer, k, v)
        self._maybe_seal(i)

    def advance(self, i: int, q: torch.Tensor, n: int) -> None:
        layer = self.layers[i]
        if layer.chunk_size == 0:  # prefill: the view was the slab itself
            k, v, p = layer.slab_k[None], layer.slab_v[None], layer.n
        else:
            k, v, p = self._views[i]
        self.append(i, q, k[:, :, p : p + n], v[:, :, p : p + n])

    def _gather_resident(self, layer: Layer, chosen: torch.Tensor | None):
        if chosen is None:
            self.counters["bytes_device"] += 2 * layer.slab_k[:, : layer.n].nbytes
            return layer.slab_k[:, : layer.n], layer.slab_v[:, : layer.n]
        size, start = layer.chunk_size, layer.n_chunks * layer.chunk_size
        idx = torch.cat([(chosen[:, None] * size + torch.arange(size)).flatten(), torch.arange(start, layer.n)])
        self.counters["bytes_device"] += 2 * len(idx) * self.n_kv * self.head_dim * layer.slab_k.element_size()
        return layer.slab_k.index_select(1, idx), layer.slab_v.index_select(1, idx)

    def _gather_tiered(self, i: int, chosen: torch.Tensor | None):
        layer = self.layers[i]
        keys = layer.keys if chosen is None else [layer.keys[c] for c in chosen.tolist()]
        self._note_selected(keys)
        kv = self._fetch(keys, self._take_prefetch(i, keys))
        layer.last_keys = keys
        self._start_prefetch((i + 1) % len(self.layers))
        return (torch.cat([c[0] for c in kv] + [layer.window_k], 1), torch.cat([c[1] for c in kv] + [layer.window_v], 1))

    def _seal(self, i: int) -> None:
        """The oldest `chunk_size` window tokens become a chunk."""
        layer = self.layers[i]
        size = layer.chunk_size
        if self.resident:
            start = layer.n_chunks * size
            kc = layer.slab_k[:, start : start + size]
        else:
            kc, vc = layer.window_k[:, :size].clone(), layer.window_v[:, :size].clone()
            bits = 32 if self.bits == "32" else DECODE_CHUNK_BITS if self.bits == "auto" else int(self.bits)
            layer.keys.append(self._store_chunk(kc, vc, bits, heat=1.0))
            layer.window_k, layer.window_v = layer.window_k[:, size:].clone(), layer.window_v[:, size:].clone()
        self._add_abstracts(i, kc[:, None])

    # -- prefetch: layer i+1's chunks while layer i computes --------------------------------------
    def _start_prefetch(self, i: int, exclude: set[int] = frozenset(), next_step: bool = False) -> None:
        """Read from disk the chunks layer i selected in its last `prefetch_steps` steps
        (consecutive queries are alike, so selections change little, and the chunks left on disk
        are the ones that come and go); host and device chunks need no early read, nor `exclude`d
        ones. next_step: the layer's next read is at the next step (layer 0's is, and a graph's)."""
        layer = self.layers[i]
        if self.pool is None or layer.last_keys is None or i in self.prefetch:
            return
        step = self.counters["steps"] + (next_step or i == 0)
        since = step - self.prefetch_steps
        at = self._selected_at
        wanted = [k for k in layer.keys
                  if at.get(k, since - 1) >= since and k not in exclude and self.store.tier_of(k) == DISK]
        if wanted:
            self.prefetch[i] = self.pool.submit(self._prefetch_read, wanted)

    def _prefetch_read(self, keys: list[int]) -> tuple[dict, float]:
        """On the prefetch thread: the stored forms of `keys`, and the seconds the read took."""
        t0 = time.perf_counter()
        loaded = self.store.load_homes(keys)
        return loaded, time.perf_counter() - t0

    def _note_selected(self, keys: list[int]) -> None:
        """These chunks were selected at this step (what prefetch predicts from)."""
        if self.pool is not None:
            step = self.counters["steps"]
            self._selected_at.update((k, step) for k in keys)

    def _take_prefetch(self, i: int, keys: list[int]) -> dict:
        """What the prefetch thread read for layer i, of `keys`."""
        fut = self.prefetch.pop(i, None)
        if fut is None:
            return {}
        t0 = time.perf_counter()
        loaded, read_s = fut.result()
        c = self.counters
        c["prefetch_wait_s"] += time.perf_counter() - t0  # the read did not finish behind layer i-1's compute
        c["prefetch_read_s"] += read_s
        c["prefetch_chunks"] += len(loaded)
        wanted = set(keys)
        used = {k: kv for k, kv in loaded.items() if k in wanted}
        c["prefetch_unused"] += len(loaded) - len(used)
        c["prefetch_unused_bytes"] += sum(t.nbytes for k, (ts, _) in loaded.items() if k not in wanted for t in ts.values())
        return used

    def _drain_prefetch(self) -> None:
        for fut in self.prefetch.values():
            fut.cancel()
            try:
                fut.result()
            except Exception:
                pass
        self.prefetch.clear()

    # -- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict:
        c, steps = self.counters, max(self.counters["steps"], 1)
        if self.store is not None:
            read = {t: round(self.store.read_bytes[t] / steps) for t in (DEVICE, HOST, DISK)}
            resident = {t: self.store.used[t] for t in (DEVICE, HOST, DISK)}
        else:
            read = {DEVICE: round(c["bytes_device"] / steps), HOST: 0, DISK: 0}
            resident = {DEVICE: sum(2 * layer.slab_k[:, : layer.n].nbytes for layer in self.layers), HOST: 0, DISK: 0}
        return {
            "kind": "tiered" if self.store is not None else "tiered (resident)",
            "budget": self.cfg.budget,
            "storage_bits": self.bits,
            "decode_steps": c["steps"],
            "budget_used": round(c["tokens_attended"] / max(c["tokens_total"], 1), 4),
            "tokens_attended_per_layer": round(c["tokens_attended"] / steps / len(self.layers), 1),
            "chunks_selected_per_step": round(c["chunks_selected"] / steps, 1),
            "bytes_read_per_token": read,
            "prefetch_hits": c["prefetch_hits"],
            "sync_reads": c["sync_reads"],
            **self._disk_stats(),
            "resident_bytes": resident,
            "chunk_sizes": [layer.chunk_size for layer in self.layers],
            "layer_spread": [round(layer.spread, 3) for layer in self.layers],
        }

    def _disk_stats(self) -> dict:
        """Decode totals of the disk tier's reads: how long the model thread waited for the disk
        (disk_wait_s: synchronous reads plus waits on unfinished prefetches), how long the prefetch
        thread read (prefetch_read_s: hidden behind compute unless waited on), and what the process
        read from storage devices (Linux /proc/self/io; small when the file sits in the page cache)."""
        if self.store is None or self.store.disk is None:
            return {}
        c = self.counters
        io = _process_read_bytes()
        return {
            # CPU seconds since decode began, all threads (the prefetch thread too) and the model's
            # thread (stats() runs on it): unlike wall time, not stretched by other processes.
            "decode_cpu_s": round(time.process_time() - self._cpu_start[0], 3),
            "decode_model_thread_cpu_s": round(time.thread_time() - self._cpu_start[1], 3),
            "disk_uncached": self.store.disk.uncached,
            "disk_wait_s": round(c["sync_read_s"] + c["prefetch_wait_s"], 4),
            "sync_read_s": round(c["sync_read_s"], 4),
            "prefetch_wait_s": round(c["prefetch_wait_s"], 4),
            "prefetch_read_s": round(c["prefetch_read_s"], 4),
            "sync_disk_reads": c["sync_disk_reads"],
            "prefetch_chunks": c["prefetch_chunks"],
            "prefetch_unused": c["prefetch_unused"],
            "prefetch_unused_bytes": c["prefetch_unused_bytes"],
            "process_read_bytes": None if io is None or self._io_start is None else io - self._io_start,
        }


def _process_read_bytes() -> int | None:
    """Bytes this process has read from storage devices (not the page cache), where Linux says."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
