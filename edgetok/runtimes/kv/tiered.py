"""The tiered KV cache (after LeoAM): chunks, key abstracts, budgeted selection, tiers, prefetch.

Prefill attends exactly: each prefill piece is stored as one provisional block and later pieces
read all earlier blocks back. `end_prefill` measures every layer's attention skew with the last
prompt queries, cuts its tokens into chunks of a size that suits that skew, stores each chunk at a
bit width that suits its importance, and sets the layer's share of the token budget.

Each decode step, per layer: the new token joins an exact recent window; attention reads the sink
chunk(s), the recent chunks, the window, and the chunks whose key abstracts bound q·k highest,
up to the layer's budget. Chunks come from the device tier (float copies) or from their home in
host RAM or on disk; a background thread reads layer i+1's likely chunks while layer i computes.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from edgetok.kernels.attention import attend, causal_mask
from edgetok.kernels.selection import chunk_scores, key_abstract
from edgetok.runtimes.kv.codec import decode_many, encode
from edgetok.runtimes.kv.config import KVConfig
from edgetok.runtimes.kv.policy import attention_profile, bits_by_importance, chunk_size_for, layer_shares
from edgetok.runtimes.kv.tiers import DEVICE, DISK, HOST, TierStore

MB = 1 << 20
DECODE_CHUNK_BITS = 8  # chunks sealed during decode, under --kv-bits auto


@dataclass
class Layer:
    chunk_size: int = 0  # 0 while prefilling
    share: float = 1.0  # of the average token budget
    keys: list[int] = field(default_factory=list)  # chunk ids in position order
    lengths: list[int] = field(default_factory=list)
    kmin: torch.Tensor | None = None  # (C, Hkv, D)
    kmax: torch.Tensor | None = None
    window_k: torch.Tensor | None = None  # (Hkv, w, D): recent tokens, exact, not yet in a chunk
    window_v: torch.Tensor | None = None
    q_obs: torch.Tensor | None = None  # (Hq, ≤W, D) last prompt queries
    last_q: torch.Tensor | None = None  # (Hq, D) previous step's query: predicts the next selection
    spread: float = 1.0

    @property
    def chunk_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def window_len(self) -> int:
        return 0 if self.window_k is None else self.window_k.shape[1]


class TieredCache:
    def __init__(self, cfg: KVConfig, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layers = [Layer() for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.homes = cfg.needs_homes
        device_bytes = None if cfg.device_mb is None else int(cfg.device_mb * MB)
        if self.homes and device_bytes is None:
            device_bytes = 0  # compressed storage without a device budget: decompress on every read
        host_bytes = None if cfg.host_mb is None else int(cfg.host_mb * MB)
        self.store = TierStore(device_bytes, host_bytes, cfg.disk_dir, decode_many)
        self.bits = cfg.storage_bits()
        self._next_key = 0
        self.prefilled = False
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetok-kv-prefetch") if self.homes else None
        self.prefetch: dict[int, Future] = {}
        self.counters = Counter()  # decode totals: steps, tokens attended, chunks selected, ...

    # -- the KVCache protocol --------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.lengths[-1]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert q.shape[0] == 1, "the tiered cache holds one sequence"
        self.lengths[layer] += k.shape[2]
        if self.layers[layer].chunk_size == 0:
            return self._attend_prefill(layer, q[0], k[0], v[0])[None]
        return self._attend_decode(layer, q[0], k[0], v[0])[None]

    def truncate(self, n: int) -> int:
        """Only a whole reset is supported: chunks and budgets were fitted to the old prompt."""
        if n >= self.length:
            return self.length
        self.reset()
        return 0

    def reset(self) -> None:
        for fut in self.prefetch.values():
            fut.cancel()
        self.prefetch.clear()
        for layer in self.layers:
            for key in layer.keys:
                self.store.drop(key)
        self.layers = [Layer() for _ in self.layers]
        self.lengths = [0] * len(self.lengths)
        self.prefilled = False
        self.counters.clear()

    def close(self) -> None:
        self.reset()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.store.close()

    def __del__(self) -> None:  # the disk file must not outlive the cache
        try:
            self.close()
        except Exception:
            pass

    # -- storage ---------------------------------------------------------------------------------
    def _new_key(self) -> int:
        self._next_key += 1
        return self._next_key

    def _store(self, k: torch.Tensor, v: torch.Tensor, bits: int, heat: float) -> int:
        key = self._new_key()
        if self.homes:
            tensors, meta = encode(k, v, bits)
            self.store.add(key, tensors, meta, heat)
        else:
            self.store.heat[key] = heat
            self.store.put_device(key, (k.contiguous(), v.contiguous()))
        return key

    def _fetch(self, keys: list[int], prefetched: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Float K/V of `keys`, counting where each came from; chunks read from below may move up."""
        prefetched = prefetched or {}
        tiers = [self.store.tier_of(k) for k in keys]
        missing = [k for k, t in zip(keys, tiers) if t != DEVICE and k not in prefetched]
        loaded = dict(prefetched)
        if missing:
            loaded.update(self.store.read_homes(missing))
            self.counters["sync_reads"] += len(missing)
        self.counters["prefetch_hits"] += sum(1 for k, t in zip(keys, tiers) if t != DEVICE and k in prefetched)
        self.store.account(keys, tiers)
        self.store.touch(keys)
        out = []
        for key, tier in zip(keys, tiers):
            if tier == DEVICE:
                out.append(self.store.device[key])
            else:
                kv = loaded[key]
                self.store.put_device(key, kv)
                out.append(kv)
        return out

    # -- prefill: exact ---------------------------------------------------------------------------
    def _attend_prefill(self, i: int, q, k, v) -> torch.Tensor:
        layer = self.layers[i]
        past = self._fetch(layer.keys) if layer.keys else []
        keys = torch.cat([p[0] for p in past] + [k], 1)
        values = torch.cat([p[1] for p in past] + [v], 1)
        out = attend(q[None], keys[None], values[None], causal_mask(k.shape[1], keys.shape[1]))[0]
        w = self.cfg.observation_window
        layer.q_obs = q[:, -w:] if layer.q_obs is None else torch.cat([layer.q_obs, q], 1)[:, -w:]
        layer.keys.append(self._store(k, v, 32, heat=0.0))  # provisional: one block per prefill piece
        layer.lengths.append(k.shape[1])
        return out

    def end_prefill(self) -> None:
        """Cut every layer's prompt into chunks by its measured attention skew."""
        if self.prefilled or self.length == 0:
            return
        spreads = []
        for layer in self.layers:
            blocks = self._fetch(layer.keys)
            for key in layer.keys:
                self.store.drop(key)
            keys = torch.cat([b[0] for b in blocks], 1)
            values = torch.cat([b[1] for b in blocks], 1)
            profile = attention_profile(layer.q_obs, keys)
            layer.spread = profile.spread
            spreads.append(profile.spread)
            self._chunk(layer, keys, values, profile.importance)
        for layer, share in zip(self.layers, layer_shares(spreads)):
            layer.share = share
        self.prefilled = True
        self.store.read_bytes.clear()  # counters report decode reads
        self.store.read_chunks.clear()

    def _chunk(self, layer: Layer, keys, values, importance) -> None:
        n = keys.shape[1]
        size = chunk_size_for(layer.spread, self.cfg.chunk_sizes)
        full = n // size
        layer.chunk_size, layer.keys, layer.lengths = size, [], []
        imp = [importance[c * size : (c + 1) * size].sum().item() for c in range(full)]
        bits = [32] * full if self.bits == "32" else bits_by_importance(imp, self.bits)
        mins, maxs = [], []
        for c in range(full):
            kc, vc = keys[:, c * size : (c + 1) * size], values[:, c * size : (c + 1) * size]
            b = 16 if (c * size < self.cfg.sink_tokens and self.bits == "auto") else bits[c]  # sinks stay sharp
            layer.keys.append(self._store(kc, vc, b, heat=imp[c] * 10))
            layer.lengths.append(size)
            lo, hi = key_abstract(kc)
            mins.append(lo)
            maxs.append(hi)
        layer.kmin = torch.stack(mins) if mins else keys.new_zeros(0, self.n_kv, self.head_dim)
        layer.kmax = torch.stack(maxs) if maxs else keys.new_zeros(0, self.n_kv, self.head_dim)
        layer.window_k, layer.window_v = keys[:, full * size :].clone(), values[:, full * size :].clone()
        layer.q_obs = None

    # -- decode: budgeted -------------------------------------------------------------------------
    def _select(self, i: int, q: torch.Tensor) -> list[int]:
        """Indices of the chunks layer i attends to for query q (Hq, D)."""
        layer = self.layers[i]
        n_chunks = len(layer.keys)
        total = layer.chunk_tokens + layer.window_len
        budget = layer.share * self.cfg.budget_tokens(self.lengths[i])
        if self.cfg.full_budget or budget >= total or n_chunks == 0:
            return list(range(n_chunks))
        size = layer.chunk_size
        sinks = max(1, -(-self.cfg.sink_tokens // size))
        recent = max(0, -(-(self.cfg.recent_tokens - layer.window_len) // size))
        always = set(range(min(sinks, n_chunks))) | set(range(max(0, n_chunks - recent), n_chunks))
        room = int((budget - layer.window_len) // size) - len(always)
        candidates = [c for c in range(n_chunks) if c not in always]
        if room > 0 and candidates:
            idx = torch.tensor(candidates)
            lengths = torch.tensor(layer.lengths)[idx]
            scores = chunk_scores(q, layer.kmin[idx], layer.kmax[idx], lengths)
            top = torch.topk(scores, min(room, len(candidates))).indices
            always |= set(idx[top].tolist())
        return sorted(always)

    def _attend_decode(self, i: int, q, k, v) -> torch.Tensor:
        layer = self.layers[i]
        layer.window_k = torch.cat([layer.window_k, k], 1)
        layer.window_v = torch.cat([layer.window_v, v], 1)
        if i == 0:
            self.store.step += 1
            self.counters["steps"] += 1
        q_last = q[:, -1]
        chosen = self._select(i, q_last)
        keys = [layer.keys[c] for c in chosen]
        prefetched = self._take_prefetch(i, keys)
        kv = self._fetch(keys, prefetched)
        self._start_prefetch((i + 1) % len(self.layers))
        all_k = torch.cat([c[0] for c in kv] + [layer.window_k], 1)
        all_v = torch.cat([c[1] for c in kv] + [layer.window_v], 1)
        t = k.shape[1]
        out = attend(q[None], all_k[None], all_v[None], causal_mask(t, all_k.shape[1]))[0]
        self.counters["tokens_attended"] += all_k.shape[1]
        self.counters["tokens_total"] += layer.chunk_tokens + layer.window_len
        self.counters["chunks_selected"] += len(chosen)
        layer.last_q = q_last
        if layer.window_len >= 2 * layer.chunk_size:  # keep ≥ one chunk of exact recent tokens
            self._seal(layer)
        return out

    def _seal(self, layer: Layer) -> None:
        size = layer.chunk_size
        kc, vc = layer.window_k[:, :size], layer.window_v[:, :size]
        bits = 32 if self.bits == "32" else DECODE_CHUNK_BITS if self.bits == "auto" else int(self.bits)
        layer.keys.append(self._store(kc.clone(), vc.clone(), bits, heat=1.0))
        layer.lengths.append(size)
        lo, hi = key_abstract(kc)
        layer.kmin = torch.cat([layer.kmin, lo[None]])
        layer.kmax = torch.cat([layer.kmax, hi[None]])
        layer.window_k, layer.window_v = layer.window_k[:, size:].clone(), layer.window_v[:, size:].clone()

    # -- prefetch: layer i+1's chunks while layer i computes --------------------------------------
    def _start_prefetch(self, i: int) -> None:
        layer = self.layers[i]
        if self.pool is None or layer.last_q is None or i in self.prefetch:
            return
        predicted = [layer.keys[c] for c in self._select(i, layer.last_q)]
        wanted = [k for k in predicted if self.store.tier_of(k) != DEVICE]
        if wanted:
            self.prefetch[i] = self.pool.submit(self.store.read_homes, wanted)

    def _take_prefetch(self, i: int, keys: list[int]) -> dict:
        fut = self.prefetch.pop(i, None)
        if fut is None:
            return {}
        got = fut.result()
        wanted = set(keys)
        self.counters["prefetch_wasted"] += sum(1 for k in got if k not in wanted)
        return {k: kv for k, kv in got.items() if k in wanted}

    # -- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict:
        c, steps = self.counters, max(self.counters["steps"], 1)
        per_token = {t: round(self.store.read_bytes[t] / steps) for t in (DEVICE, HOST, DISK)}
        return {
            "kind": "tiered",
            "budget": self.cfg.budget,
            "storage_bits": self.bits,
            "decode_steps": c["steps"],
            "budget_used": round(c["tokens_attended"] / max(c["tokens_total"], 1), 4),
            "tokens_attended_per_layer": round(c["tokens_attended"] / steps / len(self.layers), 1),
            "chunks_selected_per_step": round(c["chunks_selected"] / steps, 1),
            "bytes_read_per_token": per_token,
            "prefetch_hits": c["prefetch_hits"],
            "sync_reads": c["sync_reads"],
            "resident_bytes": {t: self.store.used[t] for t in (DEVICE, HOST, DISK)},
            "chunk_sizes": [layer.chunk_size for layer in self.layers],
            "layer_spread": [round(layer.spread, 3) for layer in self.layers],
        }
