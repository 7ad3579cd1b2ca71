"""Where a tiered cache's K/V live, behind one interface (the cache, tiered.py, decides what the
chunks are and which of them attention reads; a storage keeps the tokens and hands them out):

- ResidentStorage (no tier budgets): every token's K/V in one float slab per layer, the device
  tier; attention reads the selected chunks in place in the slab;
- TieredStorage (--kv-device-mb / --kv-host-mb / --kv-disk / --kv-bits): each chunk has a home in
  host RAM or on disk (tiers.py), stored at a bit width chosen by its importance (codec.py); the
  device tier caches copies of the chunks attention reads (their stored forms for the mixed-bit
  kernel, float for a graph's views); a thread reads layer i+1's likely chunks from disk while
  layer i computes, or, for a graph's step, the next step's while the graph runs (prefetch.py).
  The tokens after the last chunk (the window) stay in float.

A decode step's attention (`attend`) runs the mixed-bit attention op (kernels/mixed_attention.py)
over table rows that point at the chunks where they are: no float copy of the selection is made.
Without the native kernel built, it gathers float copies and attends over them (the reference).

Each storage keeps its per-layer record (a Layer subclass): the cache's fitted policy and, next
to it, where the layer's tokens are. All tensors are per layer of one sequence: (Hkv, N, D).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.kernels import mixed_attention
from edgetok.kernels.attention import attend_lse, causal_mask
from edgetok.runtimes.kv.codec import decode_many, encode, kernel_row
from edgetok.runtimes.kv.config import KVConfig
from edgetok.runtimes.kv.policy import bits_by_importance
from edgetok.runtimes.kv.prefetch import Prefetcher
from edgetok.runtimes.kv.staging import LayerKV, slab_chunks
from edgetok.runtimes.kv.stats import Counters, disk_report
from edgetok.runtimes.kv.tiers import AT_DEVICE, AT_DISK, AT_HOST, DEVICE, DISK, HOST, ROW, TierStore
from edgetok.runtimes.memory import return_large_buffers, trim_heap

MB = 1 << 20
DECODE_CHUNK_BITS = 8  # chunks sealed during decode, under --kv-bits auto
KV = tuple[torch.Tensor, torch.Tensor]


def put(slab_k: torch.Tensor, slab_v: torch.Tensor, at: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v (Hkv, T, D) into the slabs' slots at..at+T, unless a graph wrote them there already."""
    for slab, new in ((slab_k, k), (slab_v, v)):
        dst = slab[:, at : at + new.shape[1]]
        if dst.data_ptr() != new.data_ptr():
            dst.copy_(new)


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
    """Tiered: chunk ids in the TierStore, and the window of recent tokens in float. While
    prefilling, the prompt is one provisional block per piece in the TierStore (attend(): a layer
    at a time reads it), or, for a graph, a float slab the graph reads and writes in place."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # chunk keys, in token order
    prompt_k: torch.Tensor | None = None  # (Hkv, capacity, D): a graph's prompt, until cut()
    prompt_v: torch.Tensor | None = None
    prompt_n: int = 0
    window_k: torch.Tensor | None = None  # (Hkv, w, D)
    window_v: torch.Tensor | None = None
    window_room: KV | None = None  # (Hkv, capacity, D) each, whose first w tokens the window views: appends copy in
    last_keys: np.ndarray | None = None  # the chunks read at the previous step: predicts the next ones

    def add_key(self, key: int) -> None:
        self.keys = np.append(self.keys, np.int64(key))


class Storage(ABC):
    """One tiered cache's tokens. `layers` is the cache's list of layer records too (reset()
    refills it in place)."""

    kind: str  # for stats()

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, counters: Counters) -> None:
        """dtype: of the K/V attention reads; counters: the cache's decode totals."""
        self.n_kv, self.head_dim, self.dtype, self.counters = num_kv_heads, head_dim, dtype, counters
        self.layers = [self.new_layer() for _ in range(num_layers)]
        self.attention: str | None = None  # what attend() ran: the native kernel's ISA, or "reference"

    @abstractmethod
    def new_layer(self) -> Layer:
        """An empty layer record."""

    def grown(self, k: torch.Tensor | None, v: torch.Tensor | None, n: int, needed: int, unit: int = 1) -> KV:
        """Slabs (Hkv, capacity, D) holding the first n tokens of k, v (None: none yet) with room
        for `needed` tokens: k, v themselves when they have it, else new ones a quarter larger
        (capacity a multiple of `unit`)."""
        if k is not None and needed <= k.shape[1]:
            return k, v
        cap = max(256, needed + 256, needed * 5 // 4)
        cap = -(-cap // unit) * unit
        shape = (self.n_kv, cap, self.head_dim)
        # Zeros, not garbage: a graph reads the whole slab in prefill and masks the spare slots
        # (a NaN there would survive the mask).
        new_k, new_v = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        if n:
            new_k[:, :n], new_v[:, :n] = k[:, :n], v[:, :n]
        return new_k, new_v

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
    def seal(self, layer: Layer) -> KV:
        """The oldest chunk_size window tokens become the layer's next chunk: → its keys and values (Hkv, S, D)."""

    def begin_step(self) -> None:
        """A decode step begins (heat decays per step)."""

    def attend(self, i: int, chosen: torch.Tensor | None, q: torch.Tensor, head: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A decode step's attention in layer i: q (Hq, T, D) over its chunks `chosen` (sorted ids;
        None: all of them) and its window, whose last T tokens are q's own (causal) → (Hq, T, D)
        float32, the log-sum-exp of each query's scores (Hq, T) (chunk summaries merge through it),
        and the tokens attended. head: only that KV head's keys and values, q its query group
        (per-head selection; ResidentStorage). The mixed-bit kernel reads every chunk where it
        lives, at its stored width; without it (not built, or a head size it does not run), float
        copies are gathered (the reference)."""
        if not mixed_attention.supports(self.head_dim):
            self.attention = "reference"
            keys, values = self.gather(i, chosen, head)
            out, lse = attend_lse(q, keys, values, causal_mask(q.shape[1], keys.shape[1]))
            return out, lse, keys.shape[1]
        rows = self.kernel_rows(i, chosen, head)
        self.attention = mixed_attention.isas()[0]
        # One thread: at SmolLM2's sizes a second one saved nothing, alone or inside the model
        # (BENCHMARKS.md, the mixed-bit attention op), and torch's OpenMP workers hold the other core.
        out, lse = mixed_attention.attend(q, rows, self.n_kv if head is None else 1, threads=1)
        return out, lse, int(rows[:, mixed_attention.LENGTH].sum())

    @abstractmethod
    def kernel_rows(self, i: int, chosen: torch.Tensor | None, head: int | None = None,
                    causal: bool = True) -> np.ndarray:
        """The mixed-bit attention op's table for layer i's chunks `chosen` and its window (the
        last row: causal, its last tokens the queries' own; causal=False: the step's own tokens
        come in another row, a graph's), pointing at memory this storage keeps alive until the
        next step begins. head: rows of that KV head only (for a call with one KV head)."""

    def step_rows(self, chosen: list[list[torch.Tensor] | None]) -> list[list[np.ndarray]]:
        """A graph's decode step's tables, every layer's at once (the step's own tokens come in
        another row): chosen[i], layer i's selection, one id list per KV head group (None: every
        chunk) → per layer, one table per group (kernel_rows)."""
        return [[self.kernel_rows(i, None, causal=False)] if groups is None else
                [self.kernel_rows(i, ids, head=None if len(groups) == 1 else h, causal=False) for h, ids in enumerate(groups)]
                for i, groups in enumerate(chosen)]

    def slab(self, layer: Layer, room: int) -> KV | None:
        """The layer's float slabs (Hkv, capacity, D) with room for `room` more tokens, when every
        token of it lives in one (a native step then reads and writes them in place); None here."""
        return None

    def slab_written(self, layer: Layer, n: int, read: float) -> None:
        """A native step stored n tokens at the end of the layer's slab and read `read` tokens per KV head."""
        raise NotImplementedError(f"{type(self).__name__} has no slabs")

    @abstractmethod
    def gather(self, i: int, chosen: torch.Tensor | None, head: int | None = None) -> KV:
        """Layer i's chunks `chosen` (sorted ids; None: all of them) then its window, float
        (Hkv, n, D) (head: (1, n, D), that KV head's): what the reference attention reads when the
        native kernel is not built."""

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
        layer.slab_k, layer.slab_v = self.grown(layer.slab_k, layer.slab_v, layer.n, needed, self.unit)

    def append(self, layer: SlabLayer, k: torch.Tensor, v: torch.Tensor) -> None:
        self._grow(layer, layer.n + k.shape[1])
        put(layer.slab_k, layer.slab_v, layer.n, k, v)
        layer.n += k.shape[1]

    def add_prompt(self, layer: SlabLayer, k: torch.Tensor, v: torch.Tensor) -> None:
        self.append(layer, k, v)  # prompt and decoded tokens alike: into the slab

    def slab(self, layer: SlabLayer, room: int) -> KV:
        self._grow(layer, layer.n + room)
        return layer.slab_k, layer.slab_v

    def slab_written(self, layer: SlabLayer, n: int, read: float) -> None:
        layer.n += n
        self.counters["bytes_device"] += int(2 * read * self.n_kv * self.head_dim * self.itemsize)

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

    def seal(self, layer: SlabLayer) -> KV:
        start = layer.n_chunks * layer.chunk_size
        return layer.slab_k[:, start : start + layer.chunk_size], layer.slab_v[:, start : start + layer.chunk_size]

    def _slabs(self, layer: SlabLayer, head: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The layer's slabs (Hkv, cap, D), or one KV head's (1, cap, D) views, and their heads."""
        if head is None:
            return layer.slab_k, layer.slab_v, self.n_kv
        return layer.slab_k[head : head + 1], layer.slab_v[head : head + 1], 1

    def gather(self, i: int, chosen: torch.Tensor | None, head: int | None = None) -> KV:
        layer = self.layers[i]
        slab_k, slab_v, heads = self._slabs(layer, head)
        if chosen is None:
            self.counters["bytes_device"] += 2 * slab_k[:, : layer.n].nbytes
            return slab_k[:, : layer.n], slab_v[:, : layer.n]
        size, start = layer.chunk_size, layer.n_chunks * layer.chunk_size
        idx = torch.cat([(chosen[:, None] * size + torch.arange(size)).flatten(), torch.arange(start, layer.n)])
        self.counters["bytes_device"] += 2 * len(idx) * heads * self.head_dim * self.itemsize
        return slab_k.index_select(1, idx), slab_v.index_select(1, idx)

    def kernel_rows(self, i: int, chosen: torch.Tensor | None, head: int | None = None,
                    causal: bool = True) -> np.ndarray:
        """Rows into the slab itself: one per chosen chunk, then the window (every token, when
        all chunks are chosen: one row)."""
        layer = self.layers[i]
        slab_k, slab_v, heads = self._slabs(layer, head)
        size, start = layer.chunk_size, layer.n_chunks * layer.chunk_size
        if chosen is None:  # the chunks and the window are one run of the slab
            start, chosen = 0, torch.zeros(0, dtype=torch.long)
        rows = mixed_attention.slab_rows(slab_k, slab_v, chosen * size, size)
        window = mixed_attention.float_row(slab_k[:, start : layer.n], slab_v[:, start : layer.n], causal=causal)
        self.counters["bytes_device"] += 2 * (len(chosen) * size + layer.n - start) * heads * self.head_dim * self.itemsize
        return np.concatenate([rows, np.array([window], np.int64)])

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
                 cfg: KVConfig, bits: str, reads_forms: bool) -> None:
        """cfg: the tier budgets, disk folder and prefetch; bits: the storage bit width choice
        ('32': every chunk exact); reads_forms: attention reads stored forms (the mixed-bit kernel:
        the device tier caches them), not float copies (a graph's views)."""
        super().__init__(num_layers, num_kv_heads, head_dim, dtype, counters)
        self.bits, self.sink_tokens = bits, cfg.sink_tokens
        device = 0 if cfg.device_mb is None else int(cfg.device_mb * MB)  # no budget: decompress per read
        host = None if cfg.host_mb is None else int(cfg.host_mb * MB)
        # The device tier holds what attention reads: stored forms for the kernel, float for a graph.
        self.forms = reads_forms
        decompress = None if reads_forms else functools.partial(decode_many, dtype=dtype)
        self.store = TierStore(device, host, cfg.disk_dir, decompress, disk_uncached=cfg.disk_uncached,
                               describe=(lambda form: kernel_row(*form)) if reads_forms else None)
        return_large_buffers()
        self.prefetcher = Prefetcher(self.store, cfg.prefetch_steps, counters, mode=cfg.prefetch)
        if cfg.op_provider is not None and not reads_forms:
            raise EdgetokError("--kv-op-provider (KVConfig.op_provider) runs the cache's own attention; this graph attends "
                               "over views itself: run the torch backend or the default export")
        self.op = None
        if cfg.op_provider is not None:
            from edgetok.kernels.mixed_attention_onnx import Runner  # (onnx: only for this)

            self.op = Runner(cfg.op_provider)
        self._next_key = 0
        self._attending: list = []  # what this step's kernel_rows() pointed at

    def new_layer(self) -> HomedLayer:
        return HomedLayer()

    def reset(self) -> None:
        self.prefetcher.reset()
        for layer in self.layers:
            for key in layer.keys.tolist():
                self.store.drop(key)
        self._attending = []
        self.store.release()
        super().reset()

    def close(self) -> None:
        self.prefetcher.close()
        self.store.close()

    def _store_chunk(self, k: torch.Tensor, v: torch.Tensor, bits: int, heat: float) -> int:
        self._next_key += 1
        tensors, meta = encode(k, v, bits)
        self.store.add(self._next_key, tensors, meta, heat)
        return self._next_key

    def fetch(self, keys: np.ndarray, prefetched: dict | None = None) -> list:
        """What the device tier holds of `keys` (stored forms, or float K/V: see reads_forms),
        counting where each came from; chunks read from below may move up."""
        at, loaded = self._read(keys, prefetched)
        read = self._reader(loaded)
        out = [read(key, tier) for key, tier in zip(keys.tolist(), at.tolist())]
        self._admit(keys, at, read)
        return out

    def fetch_rows(self, keys: np.ndarray, prefetched: dict | None = None) -> np.ndarray:
        """fetch() as the kernel's table rows (reads_forms), the forms they point at kept alive
        until the next step."""
        self.store.hold()
        at, loaded = self._read(keys, prefetched)
        self._attending.append(loaded)  # alive until the next step: the rows point into them
        read = self._reader(loaded)
        rows = self.store.rows(keys, at, read)
        self._admit(keys, at, read)
        return rows

    def _read(self, keys: np.ndarray, prefetched: dict | None) -> tuple[np.ndarray, dict]:
        """Where each of `keys` is read from (TierStore.where, before the read), and what was
        loaded: disk payloads (read now unless prefetched), and, for float copies, every chunk
        from below decompressed. Host homes are in RAM already: stored forms are used as they
        are (_reader), nothing is done per host chunk unless asked."""
        at = self.store.where[keys]
        loaded = dict(prefetched or {})
        below = at != AT_DEVICE
        if loaded:
            below &= ~np.isin(keys, np.fromiter(loaded, np.int64, len(loaded)))
        from_disk = below & (at == AT_DISK)
        missing = keys[from_disk if self.forms else below].tolist()
        if from_disk.any():  # the model thread waits for the disk
            loaded.update(self.prefetcher.read_now(missing))
        elif missing:  # (host homes: a dict lookup)
            loaded.update(self.store.load_homes(missing))
        loaded = self.store.decompress_loaded(loaded)
        self.counters["sync_reads"] += int(np.count_nonzero(below))
        self.counters["sync_disk_reads"] += int(np.count_nonzero(from_disk))
        self.counters["prefetch_hits"] += len(keys) - int(np.count_nonzero(below)) - int(np.count_nonzero(at == AT_DEVICE))
        self.store.account(keys, at)
        return at, loaded

    def _reader(self, loaded: dict) -> Callable[[int, int], object]:
        """What a read got of chunk `key` from tier `tier` (AT_*), `loaded` by _read."""
        device, host_form = self.store.device, self.store.host_form

        def read(key: int, tier: int) -> object:
            if tier == AT_DEVICE:
                return device[key]
            got = loaded.get(key)
            return host_form(key) if got is None else got
        return read

    def _admit(self, keys: np.ndarray, at: np.ndarray, read: Callable[[int, int], object]) -> None:
        """A read's chunks from below offered to the device tier, then warmed. Admission compares
        heats before this read counts, so this layer's chunks do not look hotter than the other
        layers' just because they were read last."""
        below = at != AT_DEVICE
        self.store.put_device(keys[below].tolist(), lambda key: read(key, AT_HOST))  # (any tier below the device's)
        self.store.touch(keys)

    # -- the prompt --------------------------------------------------------------------------------
    def add_prompt(self, layer: HomedLayer, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.forms or layer.prompt_k is not None:  # a graph's: into the prompt slab (where it may have written them)
            layer.prompt_k, layer.prompt_v = self.grown(layer.prompt_k, layer.prompt_v, layer.prompt_n,
                                                        layer.prompt_n + k.shape[1])
            put(layer.prompt_k, layer.prompt_v, layer.prompt_n, k, v)
            layer.prompt_n += k.shape[1]
            return
        # provisional, exact: one block per piece, until cut() makes chunks of the whole prompt
        layer.add_key(self._store_chunk(k.to(self.dtype), v.to(self.dtype), 32, heat=0.0))

    def prefill(self, layer: HomedLayer, k: torch.Tensor, v: torch.Tensor) -> KV:
        if layer.prompt_k is not None:  # (a graph's prompt slab: exact, in place)
            self.add_prompt(layer, k, v)
            return self.layer_kv(layer)
        past = self.layer_kv(layer) if len(layer.keys) else None  # before this piece is stored
        k, v = k.to(self.dtype), v.to(self.dtype)
        self.add_prompt(layer, k, v)
        return (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))

    def fetch_float(self, keys: np.ndarray, prefetched: dict | None = None) -> list[KV]:
        """Float K/V (Hkv, S, D) of `keys` in the storage dtype."""
        got = self.fetch(keys, prefetched)
        return decode_many(got, self.dtype) if self.forms and got else got

    def layer_kv(self, layer: HomedLayer) -> KV:
        if layer.prompt_k is not None:
            return layer.prompt_k[:, : layer.prompt_n], layer.prompt_v[:, : layer.prompt_n]
        parts = self.fetch_float(layer.keys) if len(layer.keys) else []
        if layer.window_k is not None:
            parts.append((layer.window_k, layer.window_v))
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    def prompt_view(self, layer: HomedLayer, reserve: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The prompt slab itself, with room for `reserve` more tokens (the graph writes them
        there): a graph that reads views reads every layer's prompt at once, so the prompt is in
        RAM in float while it prefills (tiers bound its decode only; copies would double it). A
        graph that attends through the cache (TieredCache(reads="through")) never asks."""
        if layer.prompt_k is None and len(layer.keys):  # prefilled by attend() so far: its blocks become the slab
            keys, values = self.layer_kv(layer)
            for key in layer.keys.tolist():
                self.store.drop(key)
            layer.keys, layer.prompt_n = np.zeros(0, np.int64), keys.shape[1]
            layer.prompt_k, layer.prompt_v = self.grown(keys, values, keys.shape[1], keys.shape[1] + reserve)
        layer.prompt_k, layer.prompt_v = self.grown(layer.prompt_k, layer.prompt_v, layer.prompt_n,
                                                    layer.prompt_n + reserve)
        return layer.prompt_k[None], layer.prompt_v[None], layer.prompt_n

    def cut(self, layer: HomedLayer, keys: torch.Tensor, values: torch.Tensor, importance: torch.Tensor) -> None:
        """Chunks stored at a bit width by their importance (sinks stay sharp under auto)."""
        size = layer.chunk_size
        c = keys.shape[1] // size
        for key in layer.keys.tolist():  # the provisional prefill blocks
            self.store.drop(key)
        imp = importance[: c * size].view(c, size).sum(1).tolist()
        bits = [32] * c if self.bits == "32" else bits_by_importance(imp, self.bits)
        chunks = []
        for j in range(c):
            sl = slice(j * size, (j + 1) * size)
            b = 16 if (j * size < self.sink_tokens and self.bits == "auto") else bits[j]
            chunks.append(self._store_chunk(keys[:, sl], values[:, sl], b, heat=imp[j] * 10))
        layer.keys = np.array(chunks, np.int64)
        layer.window_k, layer.window_v = keys[:, c * size :].clone(), values[:, c * size :].clone()
        layer.window_room = None
        layer.prompt_k = layer.prompt_v = None  # (keys and values were its views: freed with the caller's)
        layer.prompt_n = 0

    def end_prefill(self) -> None:
        self.store.read_bytes.clear()
        self.store.read_chunks.clear()
        self.counters.mark_decode_start()
        trim_heap()

    # -- decode ----------------------------------------------------------------------------------
    def append(self, layer: HomedLayer, k: torch.Tensor, v: torch.Tensor) -> None:
        w, n = layer.window_k.shape[1], k.shape[1]
        room_k, room_v = self.grown(*(layer.window_room or (layer.window_k, layer.window_v)), w, w + n)
        put(room_k, room_v, w, k, v)  # (converting to the storage dtype)
        layer.window_room = room_k, room_v
        layer.window_k, layer.window_v = room_k[:, : w + n], room_v[:, : w + n]

    def window_len(self, layer: HomedLayer) -> int:
        return layer.window_k.shape[1]

    def forget_recent(self, layer: HomedLayer, n: int) -> None:
        w = layer.window_k.shape[1] - n
        layer.window_k, layer.window_v = layer.window_k[:, :w], layer.window_v[:, :w]  # (the next append writes over them)

    def seal(self, layer: HomedLayer) -> KV:
        size = layer.chunk_size
        kc, vc = layer.window_k[:, :size].clone(), layer.window_v[:, :size].clone()
        bits = 32 if self.bits == "32" else DECODE_CHUNK_BITS if self.bits == "auto" else int(self.bits)
        layer.add_key(self._store_chunk(kc, vc, bits, heat=1.0))
        layer.window_k, layer.window_v = layer.window_k[:, size:].clone(), layer.window_v[:, size:].clone()
        layer.window_room = None  # (the next append makes room again)
        return kc, vc

    def begin_step(self) -> None:
        self.store.step += 1
        self._attending = []  # (the last step's reads: what its kernel rows pointed at)
        self.store.release()

    def _selected(self, i: int, chosen: torch.Tensor | None) -> tuple[np.ndarray, dict]:
        """Layer i's chunk keys `chosen` (None: all), noted as read now, and what the prefetch
        thread read of them; then it reads the next layer's likely chunks while layer i computes."""
        layer = self.layers[i]
        keys = layer.keys if chosen is None else layer.keys[chosen.numpy()]
        self.prefetcher.note_selected(keys)
        prefetched = self.prefetcher.take(i, keys)
        layer.last_keys = keys
        nxt = (i + 1) % len(self.layers)
        self.prefetcher.start(nxt, self.layers[nxt])
        return keys, prefetched

    def attend(self, i: int, chosen: torch.Tensor | None, q: torch.Tensor, head: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Storage.attend, or, with KVConfig.op_provider, the op's ONNX form on that execution
        provider over the stored forms as read (its reference is the same native call)."""
        if self.op is None:
            return super().attend(i, chosen, q, head)
        assert head is None, "a stored chunk holds every head (KVConfig refuses per-head selection with tiers)"
        layer = self.layers[i]
        forms = self.fetch(*self._selected(i, chosen))
        out, lse = self.op.attend(q, forms, layer.window_k, layer.window_v, layer.chunk_size)
        self.attention = f"onnx ({self.op.provider})"
        return out, lse, len(forms) * layer.chunk_size + layer.window_k.shape[1]

    def gather(self, i: int, chosen: torch.Tensor | None, head: int | None = None) -> KV:
        assert head is None, "a stored chunk holds every head (KVConfig refuses per-head selection with tiers)"
        layer = self.layers[i]
        kv = self.fetch_float(*self._selected(i, chosen))
        return (torch.cat([c[0] for c in kv] + [layer.window_k], 1), torch.cat([c[1] for c in kv] + [layer.window_v], 1))

    def kernel_rows(self, i: int, chosen: torch.Tensor | None, head: int | None = None,
                    causal: bool = True) -> np.ndarray:
        assert head is None, "a stored chunk holds every head (KVConfig refuses per-head selection with tiers)"
        layer = self.layers[i]
        keys, prefetched = self._selected(i, chosen)
        if self.forms:
            rows = self.fetch_rows(keys, prefetched)
        else:  # (the device tier holds float copies)
            got = self.fetch(keys, prefetched)
            self._attending.append(got)  # alive until the next step: the rows point into them
            rows = np.array([mixed_attention.float_row(k, v) for k, v in got], np.int64).reshape(-1, ROW)
        window = mixed_attention.float_row(layer.window_k, layer.window_v, causal=causal)
        return np.concatenate([rows, np.array([window], np.int64)])

    def step_rows(self, chosen: list[list[torch.Tensor] | None]) -> list[list[np.ndarray]]:
        """Every layer's chunks read at once, as one read of the tiers (admission to the device
        tier ranks the whole step's reads by heat); then each layer's likely on-disk chunks for
        the next step are read while the graph runs (no layer computes now to hide a read behind)."""
        if not self.forms:
            return super().step_rows(chosen)
        assert all(groups is None or len(groups) == 1 for groups in chosen), "a stored chunk holds every head"
        selected, prefetched = [], {}
        for i, (layer, groups) in enumerate(zip(self.layers, chosen)):
            keys = layer.keys if groups is None else layer.keys[groups[0].numpy()]
            prefetched.update(self.prefetcher.take(i, keys))
            layer.last_keys = keys
            selected.append(keys)
        every = np.concatenate(selected)
        self.prefetcher.note_selected(every)
        rows = self.fetch_rows(every, prefetched)
        tables, at = [], 0
        for layer, keys in zip(self.layers, selected):
            window = np.array([mixed_attention.float_row(layer.window_k, layer.window_v)], np.int64)
            tables.append([np.concatenate([rows[at : at + len(keys)], window])])
            at += len(keys)
        for i, layer in enumerate(self.layers):
            self.prefetcher.start(i, layer, next_step=True)
        return tables

    def stage_source(self, i: int) -> LayerKV:
        layer = self.layers[i]
        return LayerKV(layer.chunk_size, layer.n_chunks, functools.partial(self._chunk_rows, i), layer.window_k, layer.window_v)

    def _chunk_rows(self, i: int, ids: torch.Tensor) -> KV:
        """Layer i's chunks `ids` from the tiers: K, V (Hkv, n, S·D)."""
        keys = self.layers[i].keys[ids.numpy()]
        kv = self.fetch_float(keys, self.prefetcher.take(i, keys))
        return tuple(torch.stack([t[j] for t in kv], 1).view(self.n_kv, len(keys), -1) for j in (0, 1))

    def staged(self, chosen: torch.Tensor, kept: list[int], fetched: list[torch.Tensor], attended: int) -> None:
        """The tiers' bookkeeping of a staged step: every selected chunk was used (heat; those that
        stayed staged were not fetched, so not touched yet), and the prefetch thread reads, while
        the graph runs, the on-disk chunks the layers selected lately but hold no more."""
        for i, (row, n, incoming) in enumerate(zip(chosen.tolist(), kept, fetched)):
            layer = self.layers[i]
            selected = layer.keys[row[:n]]
            came = layer.keys[incoming.numpy()]
            self.store.touch(selected[~np.isin(selected, came)])
            self.prefetcher.note_selected(selected)
            layer.last_keys = selected
            self.prefetcher.start(i, layer, exclude=selected, next_step=True)

    # -- reporting -------------------------------------------------------------------------------
    def bytes_read(self) -> dict[str, int]:
        return {tier: self.store.read_bytes[tier] for tier in (DEVICE, HOST, DISK)}

    def resident_bytes(self) -> dict[str, int]:
        held = {tier: self.store.used[tier] for tier in (DEVICE, HOST, DISK)}
        held[DEVICE] += sum(2 * layer.prompt_k[:, : layer.prompt_n].nbytes for layer in self.layers if layer.prompt_k is not None)
        return held

    def disk_stats(self) -> dict:
        return {} if self.store.disk is None else disk_report(self.counters, self.store.disk.uncached)
