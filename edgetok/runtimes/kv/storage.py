"""Where a tiered cache's K/V live, behind one interface (the cache, tiered.py, decides what the
chunks are and which of them attention reads; a storage keeps the tokens and hands them out):

- ResidentStorage (no tier budgets): every token's K/V in one float slab per layer, the device
  tier; a selection is one index_select;
- TieredStorage (--kv-device-mb / --kv-host-mb / --kv-disk / --kv-bits): each chunk has a home in
  host RAM or on disk (tiers.py), stored at a bit width chosen by its importance (codec.py); the
  device tier caches float copies of the chunks attention reads; a thread reads layer i+1's
  likely chunks from disk while layer i computes (prefetch.py). The tokens after the last chunk
  (the window) stay in float.

Each storage keeps its per-layer record (a Layer subclass): the cache's fitted policy and, next
to it, where the layer's tokens are. All tensors are per layer of one sequence: (Hkv, N, D).
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from edgetok.runtimes.kv.codec import decode_many, encode
from edgetok.runtimes.kv.config import KVConfig
from edgetok.runtimes.kv.policy import bits_by_importance
from edgetok.runtimes.kv.prefetch import Prefetcher
from edgetok.runtimes.kv.staging import LayerKV, slab_chunks
from edgetok.runtimes.kv.stats import Counters, disk_report
from edgetok.runtimes.kv.tiers import DEVICE, DISK, HOST, TierStore
from edgetok.runtimes.memory import return_large_buffers, trim_heap

MB = 1 << 20
DECODE_CHUNK_BITS = 8  # chunks sealed during decode, under --kv-bits auto
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Layer:
    """What the cache fitted to a layer's attention at end_prefill, and what selects its chunks."""

    chunk_size: int = 0  # 0 while prefilling
    share: float = 1.0  # of the average token budget
    spread: float = 1.0
    n_chunks: int = 0  # chunks sealed; their abstracts are TieredCache.abstracts[layer, ..., :n_chunks]
    q_obs: torch.Tensor | None = None  # (Hq, ≤W, D) the last prompt queries
    q_last: torch.Tensor | None = None  # (Hq, D) the last query: selects a graph's next view
    q_tail: torch.Tensor | None = None  # (Hq, r, D) the last call's last queries: a rollback's new q_last


@dataclass
class SlabLayer(Layer):
    """Resident: all tokens, chunks first then the window, in a growing slab."""

    slab_k: torch.Tensor | None = None  # (Hkv, capacity, D)
    slab_v: torch.Tensor | None = None
    n: int = 0  # tokens in the slab


@dataclass
class HomedLayer(Layer):
    """Tiered: chunk ids in the TierStore (while prefilling, one provisional block per piece),
    and the window of recent tokens in float."""

    keys: list[int] = field(default_factory=list)
    window_k: torch.Tensor | None = None  # (Hkv, w, D)
    window_v: torch.Tensor | None = None
    last_keys: list[int] | None = None  # the chunks read at the previous step: predicts the next ones


class Storage(ABC):
    """One tiered cache's tokens. `layers` is the cache's list of layer records too (reset()
    refills it in place)."""

    kind: str  # for stats()

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, counters: Counters) -> None:
        """dtype: of the K/V attention reads; counters: the cache's decode totals."""
        self.n_kv, self.head_dim, self.dtype, self.counters = num_kv_heads, head_dim, dtype, counters
        self.layers = [self.new_layer() for _ in range(num_layers)]

    @abstractmethod
    def new_layer(self) -> Layer:
        """An empty layer record."""

    def reset(self) -> None:
        """Forget every token."""
        self.layers[:] = [self.new_layer() for _ in self.layers]

    def close(self) -> None:
        """Release threads and files (the cache is done)."""

    # -- the prompt --------------------------------------------------------------------------------
    @abstractmethod
    def add_prompt(self, layer: Layer, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store prompt tokens k, v (Hkv, T, D) after the layer's tokens."""

    @abstractmethod
    def prefill(self, layer: Layer, k: torch.Tensor, v: torch.Tensor) -> KV:
        """add_prompt(k, v), and → every token of the layer, these last, in the storage dtype:
        what exact prefill attention reads."""

    @abstractmethod
    def layer_kv(self, layer: Layer) -> KV:
        """All of the layer's tokens, in order, in the storage dtype (Hkv, N, D)."""

    @abstractmethod
    def prompt_view(self, layer: Layer, reserve: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A graph's view of the layer while prefilling (GraphCache.view): (1, Hkv, S, D) keys and
        values whose first P slots are every stored token, and P."""

    @abstractmethod
    def cut(self, layer: Layer, keys: torch.Tensor, values: torch.Tensor, importance: torch.Tensor) -> None:
        """end_prefill: the prompt's tokens keys, values (Hkv, N, D) become the layer's first
        N // chunk_size chunks, then its window; importance (N,): the attention each received."""

    def end_prefill(self) -> None:
        """Decode begins (the counters were just cleared)."""

    # -- decode ----------------------------------------------------------------------------------
    @abstractmethod
    def append(self, layer: Layer, k: torch.Tensor, v: torch.Tensor) -> None:
        """Decoded tokens k, v (Hkv, T, D) join the window (which may already hold them in place)."""

    @abstractmethod
    def window_len(self, layer: Layer) -> int:
        """Tokens after the layer's last chunk."""

    @abstractmethod
    def forget_recent(self, layer: Layer, n: int) -> None:
        """Drop the window's last n tokens (n ≤ window_len: a rolled-back draft)."""

    @abstractmethod
    def seal(self, layer: Layer) -> torch.Tensor:
        """The oldest chunk_size window tokens become the layer's next chunk: → its keys (Hkv, S, D)."""

    def begin_step(self) -> None:
        """A decode step begins (heat decays per step)."""

    @abstractmethod
    def gather(self, i: int, chosen: torch.Tensor | None) -> KV:
        """Layer i's chunks `chosen` (sorted ids; None: all of them) then its window, float
        (Hkv, n, D): what a decode step's attention reads."""

    @abstractmethod
    def stage_source(self, i: int) -> LayerKV:
        """Where a graph's stage buffers fetch layer i's chunks and window from."""

    @abstractmethod
    def staged(self, chosen: torch.Tensor, kept: list[int], fetched: list[torch.Tensor], attended: int) -> None:
        """A graph's views were staged for this step: chosen (L, K) chunk ids, of which row l's
        first kept[l] count; fetched[l]: the ids copied in for layer l (the others stayed staged);
        attended: the tokens the views hold, all layers."""

    # -- reporting -------------------------------------------------------------------------------
    @abstractmethod
    def bytes_read(self) -> dict[str, int]:
        """Per tier, the bytes decode has read so far."""

    @abstractmethod
    def resident_bytes(self) -> dict[str, int]:
        """Per tier, the bytes held now."""

    def disk_stats(self) -> dict:
        """The disk tier's measurements, if there is one."""
        return {}


class ResidentStorage(Storage):
    kind = "tiered (resident)"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, counters: Counters,
                 unit: int) -> None:
        """unit: slab capacities are multiples of it (of every chunk size): a slab views as
        (Hkv, chunks, S·D), each chunk one row."""
        super().__init__(num_layers, num_kv_heads, head_dim, dtype, counters)
        self.unit = unit
        self.itemsize = torch.empty(0, dtype=dtype).element_size()

    def new_layer(self) -> SlabLayer:
        return SlabLayer()

    def _grow(self, layer: SlabLayer, needed: int) -> None:
        """Room in the slab for `needed` tokens (a quarter more each time it grows)."""
        if layer.slab_k is not None and needed <= layer.slab_k.shape[1]:
            return
        cap = max(256, needed + 256, needed * 5 // 4)
        cap = -(-cap // self.unit) * self.unit
        shape = (self.n_kv, cap, self.head_dim)
        # Zeros, not garbage: a graph reads the whole slab in prefill and masks the spare slots
        # (a NaN there would survive the mask).
        new_k, new_v = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        if layer.n:
            new_k[:, : layer.n], new_v[:, : layer.n] = layer.slab_k[:, : layer.n], layer.slab_v[:, : layer.n]
        layer.slab_k, layer.slab_v = new_k, new_v

    def append(self, layer: SlabLayer, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[1]
        self._grow(layer, layer.n + t)
        for slab, new in ((layer.slab_k, k), (layer.slab_v, v)):
            dst = slab[:, layer.n : layer.n + t]
            if dst.data_ptr() != new.data_ptr():  # a graph may have written them in place
                dst.copy_(new)
        layer.n += t

    def add_prompt(self, layer: SlabLayer, k: torch.Tensor, v: torch.Tensor) -> None:
        self.append(layer, k, v)  # prompt and decoded tokens alike: into the slab

    def prefill(self, layer: SlabLayer, k: torch.Tensor, v: torch.Tensor) -> KV:
        self.append(layer, k, v)
        return self.layer_kv(layer)

    def layer_kv(self, layer: SlabLayer) -> KV:
        return layer.slab_k[:, : layer.n], layer.slab_v[:, : layer.n]

    def prompt_view(self, layer: SlabLayer, reserve: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The slab itself, with room for `reserve` more tokens (the graph may write them there)."""
        self._grow(layer, layer.n + reserve)
        return layer.slab_k[None], layer.slab_v[None], layer.n

    def cut(self, layer: SlabLayer, keys: torch.Tensor, values: torch.Tensor, importance: torch.Tensor) -> None:
        pass  # chunks are slab rows: the slab stays as it is

    def window_len(self, layer: SlabLayer) -> int:
        return layer.n - layer.n_chunks * layer.chunk_size

    def forget_recent(self, layer: SlabLayer, n: int) -> None:
        layer.n -= n  # the slab's rows past n are overwritten by the next append

    def seal(self, layer: SlabLayer) -> torch.Tensor:
        start = layer.n_chunks * layer.chunk_size
        return layer.slab_k[:, start : start + layer.chunk_size]

    def gather(self, i: int, chosen: torch.Tensor | None) -> KV:
        layer = self.layers[i]
        if chosen is None:
            self.counters["bytes_device"] += 2 * layer.slab_k[:, : layer.n].nbytes
            return layer.slab_k[:, : layer.n], layer.slab_v[:, : layer.n]
        size, start = layer.chunk_size, layer.n_chunks * layer.chunk_size
        idx = torch.cat([(chosen[:, None] * size + torch.arange(size)).flatten(), torch.arange(start, layer.n)])
        self.counters["bytes_device"] += 2 * len(idx) * self.n_kv * self.head_dim * self.itemsize
        return layer.slab_k.index_select(1, idx), layer.slab_v.index_select(1, idx)

    def stage_source(self, i: int) -> LayerKV:
        layer = self.layers[i]
        start = layer.n_chunks * layer.chunk_size
        chunks = slab_chunks(layer.slab_k, layer.slab_v, layer.chunk_size)
        window_k, window_v = layer.slab_k[:, start : layer.n], layer.slab_v[:, start : layer.n]
        return LayerKV(layer.chunk_size, layer.n_chunks, chunks, window_k, window_v)

    def staged(self, chosen: torch.Tensor, kept: list[int], fetched: list[torch.Tensor], attended: int) -> None:
        self.counters["bytes_device"] += 2 * attended * self.n_kv * self.head_dim * self.itemsize

    def bytes_read(self) -> dict[str, int]:
        return {DEVICE: self.counters["bytes_device"], HOST: 0, DISK: 0}

    def resident_bytes(self) -> dict[str, int]:
        held = sum(2 * layer.slab_k[:, : layer.n].nbytes for layer in self.layers if layer.slab_k is not None)
        return {DEVICE: held, HOST: 0, DISK: 0}


class TieredStorage(Storage):
    kind = "tiered"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, counters: Counters,
                 cfg: KVConfig, bits: str) -> None:
        """cfg: the tier budgets, disk folder and prefetch; bits: the storage bit width choice
        ('32': every chunk exact)."""
        super().__init__(num_layers, num_kv_heads, head_dim, dtype, counters)
        self.bits, self.sink_tokens = bits, cfg.sink_tokens
        device = 0 if cfg.device_mb is None else int(cfg.device_mb * MB)  # no budget: decompress per read
        host = None if cfg.host_mb is None else int(cfg.host_mb * MB)
        self.store = TierStore(device, host, cfg.disk_dir, functools.partial(decode_many, dtype=dtype),
                               disk_uncached=cfg.disk_uncached)
        return_large_buffers()
        self.prefetcher = Prefetcher(self.store, cfg.prefetch_steps, counters, enabled=cfg.prefetch)
        self._next_key = 0

    def new_layer(self) -> HomedLayer:
        return HomedLayer()

    def reset(self) -> None:
        self.prefetcher.reset()
        for layer in self.layers:
            for key in layer.keys:
                self.store.drop(key)
        super().reset()

    def close(self) -> None:
        self.prefetcher.close()
        self.store.close()

    def _store_chunk(self, k: torch.Tensor, v: torch.Tensor, bits: int, heat: float) -> int:
        self._next_key += 1
        tensors, meta = encode(k, v, bits)
        self.store.add(self._next_key, tensors, meta, heat)
        return self._next_key

    def fetch(self, keys: list[int], prefetched: dict | None = None) -> list[KV]:
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

    # -- the prompt --------------------------------------------------------------------------------
    def add_prompt(self, layer: HomedLayer, k: torch.Tensor, v: torch.Tensor) -> None:
        # provisional, exact: one block per piece, until cut() makes chunks of the whole prompt
        layer.keys.append(self._store_chunk(k.to(self.dtype), v.to(self.dtype), 32, heat=0.0))

    def prefill(self, layer: HomedLayer, k: torch.Tensor, v: torch.Tensor) -> KV:
        past = self.layer_kv(layer) if layer.keys else None  # before this piece is stored
        k, v = k.to(self.dtype), v.to(self.dtype)
        self.add_prompt(layer, k, v)
        return (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))

    def layer_kv(self, layer: HomedLayer) -> KV:
        parts = self.fetch(layer.keys) if layer.keys else []
        if layer.window_k is not None:
            parts.append((layer.window_k, layer.window_v))
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    def prompt_view(self, layer: HomedLayer, reserve: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A copy, exactly the stored tokens (no room: a graph appends its new tokens)."""
        if not layer.keys:
            empty = torch.zeros(self.n_kv, 0, self.head_dim, dtype=self.dtype)
            return empty[None], empty[None], 0
        keys, values = self.layer_kv(layer)
        return keys[None], values[None], keys.shape[1]

    def cut(self, layer: HomedLayer, keys: torch.Tensor, values: torch.Tensor, importance: torch.Tensor) -> None:
        """Chunks stored at a bit width by their importance (sinks stay sharp under auto)."""
        size = layer.chunk_size
        c = keys.shape[1] // size
        for key in layer.keys:  # the provisional prefill blocks
            self.store.drop(key)
        imp = importance[: c * size].view(c, size).sum(1).tolist()
        bits = [32] * c if self.bits == "32" else bits_by_importance(imp, self.bits)
        layer.keys = []
        for j in range(c):
            sl = slice(j * size, (j + 1) * size)
            b = 16 if (j * size < self.sink_tokens and self.bits == "auto") else bits[j]
            layer.keys.append(self._store_chunk(keys[:, sl], values[:, sl], b, heat=imp[j] * 10))
        layer.window_k, layer.window_v = keys[:, c * size :].clone(), values[:, c * size :].clone()

    def end_prefill(self) -> None:
        self.store.read_bytes.clear()
        self.store.read_chunks.clear()
        self.counters.mark_decode_start()
        trim_heap()

    # -- decode ----------------------------------------------------------------------------------
    def append(self, layer: HomedLayer, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = k.to(self.dtype), v.to(self.dtype)
        layer.window_k, layer.window_v = torch.cat([layer.window_k, k], 1), torch.cat([layer.window_v, v], 1)

    def window_len(self, layer: HomedLayer) -> int:
        return layer.window_k.shape[1]

    def forget_recent(self, layer: HomedLayer, n: int) -> None:
        w = layer.window_k.shape[1] - n
        layer.window_k, layer.window_v = layer.window_k[:, :w], layer.window_v[:, :w]  # (the next append copies)

    def seal(self, layer: HomedLayer) -> torch.Tensor:
        size = layer.chunk_size
        kc, vc = layer.window_k[:, :size].clone(), layer.window_v[:, :size].clone()
        bits = 32 if self.bits == "32" else DECODE_CHUNK_BITS if self.bits == "auto" else int(self.bits)
        layer.keys.append(self._store_chunk(kc, vc, bits, heat=1.0))
        layer.window_k, layer.window_v = layer.window_k[:, size:].clone(), layer.window_v[:, size:].clone()
        return kc

    def begin_step(self) -> None:
        self.store.step += 1

    def gather(self, i: int, chosen: torch.Tensor | None) -> KV:
        layer = self.layers[i]
        keys = layer.keys if chosen is None else [layer.keys[c] for c in chosen.tolist()]
        self.prefetcher.note_selected(keys)
        kv = self.fetch(keys, self.prefetcher.take(i, keys))
        layer.last_keys = keys
        nxt = (i + 1) % len(self.layers)
        self.prefetcher.start(nxt, self.layers[nxt])  # while layer i computes
        return (torch.cat([c[0] for c in kv] + [layer.window_k], 1), torch.cat([c[1] for c in kv] + [layer.window_v], 1))

    def stage_source(self, i: int) -> LayerKV:
        layer = self.layers[i]
        return LayerKV(layer.chunk_size, layer.n_chunks, functools.partial(self._chunk_rows, i), layer.window_k, layer.window_v)

    def _chunk_rows(self, i: int, ids: torch.Tensor) -> KV:
        """Layer i's chunks `ids` from the tiers: K, V (Hkv, n, S·D)."""
        keys = [self.layers[i].keys[c] for c in ids.tolist()]
        kv = self.fetch(keys, self.prefetcher.take(i, keys))
        return tuple(torch.stack([t[j] for t in kv], 1).view(self.n_kv, len(keys), -1) for j in (0, 1))

    def staged(self, chosen: torch.Tensor, kept: list[int], fetched: list[torch.Tensor], attended: int) -> None:
        """The tiers' bookkeeping of a staged step: every selected chunk was used (heat; those that
        stayed staged were not fetched, so not touched yet), and the prefetch thread reads, while
        the graph runs, the on-disk chunks the layers selected lately but hold no more."""
        for i, (row, n, incoming) in enumerate(zip(chosen.tolist(), kept, fetched)):
            layer = self.layers[i]
            selected = [layer.keys[c] for c in row[:n]]
            came = {layer.keys[c] for c in incoming.tolist()}
            self.store.touch([k for k in selected if k not in came])
            self.prefetcher.note_selected(selected)
            layer.last_keys = selected
            self.prefetcher.start(i, layer, exclude=set(selected), next_step=True)

    # -- reporting -------------------------------------------------------------------------------
    def bytes_read(self) -> dict[str, int]:
        return {tier: self.store.read_bytes[tier] for tier in (DEVICE, HOST, DISK)}

    def resident_bytes(self) -> dict[str, int]:
        return {tier: self.store.used[tier] for tier in (DEVICE, HOST, DISK)}

    def disk_stats(self) -> dict:
        return {} if self.store.disk is None else disk_report(self.counters, self.store.disk.uncached)
