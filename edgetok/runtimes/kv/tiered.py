"""The tiered KV cache (after LeoAM): chunks, key abstracts, budgeted selection.

Prefill attends exactly. `end_prefill` measures every layer's attention skew with the last prompt
queries and sets, per layer, the chunk size (small where attention is concentrated) and the share
of the token budget (large where it is spread), and pins the chunks those queries attended to
most (policy.pinned_chunks). Each decode step, per layer, attention reads the sink chunk(s), the
recent chunks, the pinned chunks, the not-yet-chunked window, and the chunks whose key abstracts
(per-chunk min/max of the keys) bound q·k highest — up to the layer's budget, or, with
--kv-budget auto, as many as cover the target share of every head's estimated attention (the
bounds' softmax at a temperature fitted to the prompt's measured attention). When the cache
attends itself with every chunk in RAM, each KV head selects its own chunks (--kv-selection head,
the default there). With --kv-summaries on, each chunk the step does not read joins the same
softmax as one pseudo-token, its mean key and value (kernels/summaries.py): the unread chunks'
contribution, estimated. What the selection cost is counted in kv/fidelity.py.

This module is the policy. Where the chunks live is the storage's business (storage.py: every
token in a float slab in RAM, or chunks in host/disk tiers with float copies cached on device);
a graph's views are staged in staging.py; what the cache reports is built in stats.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.kernels import mixed_attention
from edgetok.kernels.attention import attend, causal_mask
from edgetok.kernels.mixed_attention import SlabStep, StepTables
from edgetok.kernels.selection import captured_mass, fit_temperature, select_chunks, stored_abstracts
from edgetok.kernels.summaries import chunk_summaries, fold
from edgetok.kernels.token_scores import KeySketch, channels_for, forced_chunks, select_by_masses, token_masses
from edgetok.runtimes.kv.arrays import numpy_dtype, to_numpy, to_torch
from edgetok.runtimes.kv.base import AttendingCache, GraphCache, KVState
from edgetok.runtimes.kv.config import AUTO_FLOOR, KVConfig
from edgetok.runtimes.kv.fidelity import Fidelity
from edgetok.runtimes.kv.policy import allocate, attention_profile, chunk_size_for, layer_shares, pinned_chunks
from edgetok.runtimes.kv.staging import Stages
from edgetok.runtimes.kv.stats import Counters, report
from edgetok.runtimes.kv.storage import Layer, ResidentStorage, Storage, TieredStorage

STEP_TOKENS = 16  # the most tokens a native step attends: a decode step, or a draft of up to 15 being verified


class TieredCache(AttendingCache, GraphCache):
    @property
    def queries_read(self) -> int:
        """The last prompt queries measure each layer's skew; in decode the last one selects."""
        return max(1, self.cfg.observation_window)

    def __init__(
        self, cfg: KVConfig, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype | None = None, reads: str = "kernel",
    ) -> None:
        """dtype: of the K/V attention reads (default: bf16 when approximate, float32 when exact);
        reads: what drives it, so what its device tier caches — "kernel" (attend(): the mixed-bit
        kernel reads stored forms), "views" (a graph: float copies to stage), or "through" (a
        graph that hands each layer's attention to attend(): stored forms, and every layer's
        chunks selected at once when the first layer's arrive, each with its last query — the
        hand-over costs a call per layer, a selection per layer would cost as much again)."""
        assert reads in ("kernel", "views", "through"), reads
        attends = reads != "views"
        self.selects_ahead = reads == "through"
        self._chosen: list = []  # selects_ahead: this step's chunks, per layer
        self._in_slabs = False  # fill_tables: this step's layers attend in their slabs (selected inside the step)
        self._selecting: list[bool] = []  # ... and which of them select (the others read every chunk)
        self._at: list[int] = []  # fill_tables: the step's layer of each of this cache's layers
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = num_heads, num_kv_heads, head_dim
        self.channels = channels_for(head_dim)  # R: the channels token scores read
        self.lengths = [0] * num_layers  # tokens stored per layer
        self.skipped = [0] * num_layers  # positions a layer never stores (pruned prompt tokens)
        self.bits = cfg.storage_bits()
        # Approximate attention reads bf16 K/V (half the bytes: the decode cost at long contexts);
        # an exact cache keeps float32.
        self.dtype = dtype or (torch.float32 if self.bits == "32" else torch.bfloat16)
        self.counters = Counters()
        common = (num_layers, num_kv_heads, head_dim, self.dtype, self.counters)
        self.storage: Storage = (TieredStorage(*common, cfg, self.bits, reads_forms=attends) if cfg.needs_homes
                                 else ResidentStorage(*common, unit=math.lcm(*cfg.chunk_sizes)))
        self.layers: list[Layer] = self.storage.layers  # (the storage's records: one list)
        # (L, Hkv, 2D, capacity): per layer, the max then min keys of each chunk, bf16 rounded outward
        # (selection.stored_abstracts; bounds are computed from them every step)
        self.abstracts = torch.zeros(num_layers, num_kv_heads, 2 * head_dim, 0, dtype=torch.bfloat16)
        self.pinned = torch.zeros(num_layers, 0, dtype=torch.bool)  # (L, capacity): chunks always read (policy.pinned_chunks)
        # KVConfig.summaries: when on, (L, Hkv, capacity, 2D) float32, each chunk's mean key and
        # mean value (kernels/summaries.py), resident: 1/8 of bf16 K/V at 16-token chunks
        self.summarize = cfg.summaries_for(attends=attends)
        self.per_head = cfg.per_head_for(attends=attends)  # each KV head selects its own chunks
        # (else by the chunks' bounds; a graph's native step scores bf16 slabs only: exact float32 ones rank by bounds)
        self.scores_tokens = cfg.scores_tokens and (self.dtype == torch.bfloat16 or not self.selects_ahead)
        # token scores: per layer, its chunks' keys as 4-bit codes, channel-major (token_scores.KeySketch), written as chunks seal
        self.sketches = [KeySketch() for _ in range(num_layers)]
        self.summaries = torch.zeros(num_layers, num_kv_heads, 0, 2 * head_dim)
        self.n_pinned = [0] * num_layers
        self.stages = Stages(num_layers, num_kv_heads, head_dim, self.dtype)  # a graph's resident views
        self._views: list[tuple] = []  # this decode step's view of each layer (a graph's backend)
        self.budgets: list[float] = []
        self.fidelity = Fidelity(num_layers)  # budgets chosen, attention captured
        # --kv-budget auto: per layer, the temperature at which the chunks' bound shares track the
        # prompt's measured attention (fitted at end_prefill)
        self.temperatures = torch.ones(num_layers)

    # -- KVCache ---------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.lengths[-1] + self.skipped[-1]

    def skip(self, layer: int, n: int, kept: torch.Tensor) -> None:  # (no windows: kept's gaps do not matter)
        self.skipped[layer] += n

    def truncate(self, n: int) -> int:
        """In decode, tokens still in every layer's window (a rejected draft: windows are sealed
        at the start of a step, so a step's own tokens are all there) are simply forgotten.
        Anything else is a whole reset: chunk sizes and budgets were fitted to the old prompt."""
        if n >= self.length:
            return self.length
        drop = self.length - n
        if self.layers[0].chunk_size and all(drop <= self.storage.window_len(layer) for layer in self.layers):
            for i, layer in enumerate(self.layers):
                self.storage.forget_recent(layer, drop)
                self.stages.shorten_window(i, self.storage.window_len(layer))
                self.lengths[i] -= drop
                if layer.q_tail is not None and drop < layer.q_tail.shape[1]:  # a graph's next view selects with it
                    layer.q_tail = layer.q_tail[:, : layer.q_tail.shape[1] - drop]
                    layer.q_last = layer.q_tail[:, -1]
            return n
        self.reset()
        return 0

    def reset(self) -> None:
        self.storage.reset()
        self.abstracts = torch.zeros(self.abstracts.shape[:3] + (0,), dtype=torch.bfloat16)  # (no view: reset runs in __del__ too)
        self.pinned = torch.zeros(len(self.lengths), 0, dtype=torch.bool)
        self.summaries = torch.zeros(self.summaries.shape[:2] + (0, self.summaries.shape[3]))
        self.n_pinned = [0] * len(self.lengths)
        self.sketches = [KeySketch() for _ in self.lengths]
        self.stages.reset()
        self._views = []
        self.lengths = [0] * len(self.lengths)
        self.skipped = [0] * len(self.skipped)
        self.counters.clear()
        self.fidelity.clear()

    def close(self) -> None:
        self.reset()
        self.storage.close()

    def __del__(self) -> None:  # the disk file must not outlive the cache
        try:
            self.close()
        except Exception:
            pass

    @property
    def kv_dtype(self):
        return numpy_dtype(self.dtype)

    @property
    def state(self) -> KVState:
        """Every layer's prompt K/V (before end_prefill) and its last prompt queries."""
        assert self.layers[0].chunk_size == 0, "save the prompt's state before end_prefill"
        assert not any(self.skipped), "a pruned prompt's K/V is not a prefix anyone can reuse"
        return KVState([tuple(to_numpy(x) for x in self.storage.layer_kv(layer)) for layer in self.layers],
                       [None if layer.q_obs is None else to_numpy(layer.q_obs) for layer in self.layers])

    @state.setter
    def state(self, state: KVState) -> None:
        """Take stored K/V ((Hkv, N, D) per layer) as this cache's first N prompt tokens."""
        assert self.length == 0
        for i, ((k, v), layer) in enumerate(zip(state.layers, self.layers)):
            self.storage.add_prompt(layer, to_torch(k), to_torch(v))
            layer.q_obs = to_torch(state.q_obs[i]) if state.q_obs and state.q_obs[i] is not None else None
            # the last query, as a prefill leaves it: a graph's first decode view selects with it
            layer.q_last = None if layer.q_obs is None else layer.q_obs[:, -1]
            self.lengths[i] = k.shape[1]

    def stats(self) -> dict:
        auto = {"coverage": self.cfg.coverage} | ({"auto_floor": AUTO_FLOOR} if self.scores_tokens else
                                                 {"coverage_temperatures": [round(t, 2) for t in self.temperatures.tolist()]})
        chosen = {"selection": "head" if self.per_head else "layer", "summaries": "on" if self.summarize else "off",
                  "scoring": "tokens" if self.scores_tokens else "bounds"}
        if self.scores_tokens:  # (beside the K/V: what ranking by token scores costs in memory)
            chosen["sketch_mb"] = round(sum(s.nbytes for s in self.sketches) / 2**20, 2)
        return report(self.cfg, self.bits, self.storage) | chosen | self.fidelity.report() | (auto if self.cfg.is_auto else {})

    # -- AttendingCache --------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert q.shape[0] == 1, "the tiered cache holds one sequence"
        self.lengths[layer] += k.shape[2]
        q, k, v = q[0], k[0], v[0]
        if self.layers[layer].chunk_size == 0:  # prefill: exact
            keys, values = self.storage.prefill(self.layers[layer], k, v)
            self._observe(self.layers[layer], q)
            self.layers[layer].q_last, self.layers[layer].q_tail = q[:, -1], q
            out = self._attend(q, keys, values, k.shape[1])
        else:
            out = self._attend_decode(layer, q, k, v)
        return out[None].to(q.dtype)  # the model's dtype (bf16 weights: bf16), as the contiguous cache returns

    @staticmethod
    def _attend(q, keys, values, t: int) -> torch.Tensor:
        """q (Hq, T, D) over keys/values (Hkv, S, D), in the storage dtype; float32 out."""
        out = attend(q[None].to(keys.dtype), keys[None], values[None], causal_mask(t, keys.shape[1]))[0]
        return out.float()

    def _observe(self, layer: Layer, q: torch.Tensor) -> None:
        """Keep the last observation_window prompt queries (Hq, ≤W, D): end_prefill measures with them."""
        w = self.cfg.observation_window
        layer.q_obs = q[:, -w:] if layer.q_obs is None else torch.cat([layer.q_obs, q], 1)[:, -w:]

    def _attend_decode(self, i: int, q, k, v) -> torch.Tensor:
        layer = self.layers[i]
        if i == 0:
            self._begin_step()
            if self.selects_ahead:
                self._select_ahead()
        chosen = self._chosen[i] if self.selects_ahead else self._select(i, q[:, -1])
        layer.q_last, layer.q_tail = q[:, -1], q  # (the next step's selection ahead, or a rollback's)
        self.storage.append(layer, k, v)
        if chosen is None or len(chosen) == 1:  # the mixed-bit op: chunks read where they live
            out, lse, attended = self.storage.attend(i, None if chosen is None else chosen[0], q)
        else:  # each KV head its own chunks, with its query group
            g = q.shape[0] // self.n_kv
            parts = [self.storage.attend(i, ids, q[h * g : (h + 1) * g], head=h) for h, ids in enumerate(chosen)]
            out, lse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            attended = sum(p[2] for p in parts) / len(parts)  # tokens per head
        if chosen is not None and self.summarize:
            out = self._fold_unread(i, q, out, lse, chosen)
        self._count(i, self._chunks_read(i, chosen), attended)
        if not self.cfg.needs_homes and Fidelity.sampled(self.counters["steps"]):
            self._measure_read(i, q[:, -1], chosen)
        return out

    def _fold_unread(self, i: int, q, out, lse, chosen: list[torch.Tensor]) -> torch.Tensor:
        """Layer i's attention out (Hq, T, D) over the chosen chunks (one id list for all KV heads,
        or one per head) and the window (lse (Hq, T)), with every other chunk added as its
        summary's pseudo-token."""
        layer = self.layers[i]
        unread = torch.ones(len(chosen), layer.n_chunks, dtype=torch.bool)  # (1 or Hkv, C)
        for row, ids in zip(unread, chosen):
            row[ids] = False
        self.fidelity.summarized(i, unread.sum().item() / len(chosen))
        return fold(q, out, lse, self.summaries[i, :, : layer.n_chunks], unread, layer.chunk_size)

    def _measure_read(self, i: int, q: torch.Tensor, chosen: list[torch.Tensor] | None) -> None:
        """At sampled steps, the captured mass of what layer i's step read (_select's chosen)."""
        if chosen is None or len(chosen) == 1:
            self._measure(i, q, self.storage.gather(i, None if chosen is None else chosen[0])[0])
            return
        keys, g = self.storage.layer_kv(self.layers[i])[0], q.shape[0] // self.n_kv
        self.fidelity.measured(i, torch.cat([captured_mass(q[h * g : (h + 1) * g], self.storage.gather(i, ids, head=h)[0],
                                                           keys[h : h + 1]) for h, ids in enumerate(chosen)]))

    def _measure(self, i: int, q: torch.Tensor, attended: torch.Tensor) -> None:
        """At sampled steps, the share of layer i's exact attention (query q (Hq, D)) that the keys
        read, attended (Hkv, S, D), held (kv/fidelity.py; in RAM only)."""
        if self.cfg.needs_homes or not Fidelity.sampled(self.counters["steps"]):
            return  # (the graph path's append calls this every step)
        self.fidelity.measured(i, captured_mass(q, attended, self.storage.layer_kv(self.layers[i])[0]))

    # -- end of the prompt: chunk sizes and budget shares ------------------------------------------
    def end_prefill(self) -> None:
        """Fit chunk sizes, budgets and bit widths to the prompt's measured attention."""
        if self.length == 0 or self.layers[0].chunk_size:
            return
        spreads = []
        for i, layer in enumerate(self.layers):
            keys, values = self.storage.layer_kv(layer)
            q_obs = layer.q_obs.float()
            profile = attention_profile(q_obs, keys.float())
            layer.spread, layer.q_obs = profile.spread, None
            layer.chunk_size = chunk_size_for(profile.spread, self.cfg.chunk_sizes)
            if self.cfg.is_auto and not self.scores_tokens:  # (a fixed budget ranks and estimates at temperature 1, unfitted)
                self.temperatures[i] = fit_temperature(q_obs, keys, profile.attention, layer.chunk_size, self.cfg.coverage)
            spreads.append(profile.spread)
            c = keys.shape[1] // layer.chunk_size
            shape = (self.n_kv, c, layer.chunk_size, self.head_dim)
            self._add_abstracts(i, keys[:, : c * layer.chunk_size].reshape(shape), values[:, : c * layer.chunk_size].reshape(shape))
            if not self.cfg.full_budget:
                pins = pinned_chunks(profile.attention, layer.chunk_size, c, self.cfg.sink_tokens)
                self.pinned[i, pins] = True
                self.n_pinned[i] = len(pins)
            self.storage.cut(layer, keys, values, profile.importance)
        for layer, share in zip(self.layers, layer_shares(spreads)):
            layer.share = share
        self.counters.clear()  # the counters report decode (prefill read its blocks through the storage too)
        self.fidelity.clear()
        self.storage.end_prefill()

    def _add_abstracts(self, i: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values (Hkv, C, S, D): layer i's next C chunks (their abstracts, and summaries)."""
        layer, c = self.layers[i], keys.shape[1]
        need = layer.n_chunks + c
        if need > self.abstracts.shape[3]:
            grown = torch.zeros(self.abstracts.shape[:3] + (max(need + 64, need * 5 // 4),), dtype=torch.bfloat16)
            grown[..., : self.abstracts.shape[3]] = self.abstracts
            self.abstracts = grown
            pinned = torch.zeros(self.pinned.shape[0], grown.shape[3], dtype=torch.bool)
            pinned[:, : self.pinned.shape[1]] = self.pinned
            self.pinned = pinned
            if self.summarize:
                summaries = torch.zeros(self.summaries.shape[:2] + (grown.shape[3], self.summaries.shape[3]))
                summaries[:, :, : self.summaries.shape[2]] = self.summaries
                self.summaries = summaries
        self.abstracts[i, :, :, layer.n_chunks : need] = stored_abstracts(keys)
        if self.summarize:
            self.summaries[i, :, layer.n_chunks : need] = chunk_summaries(keys, values)
        if self.scores_tokens:
            self.sketches[i].add(keys.flatten(1, 2))
        layer.n_chunks = need

    # -- decode: budgets and selection -----------------------------------------------------------
    def _plan(self, i: int) -> tuple[int, int, int] | None:
        """How many of layer i's chunks it attends to this step, and how many of them are forced
        (sinks, recent): (keep, sinks, recent); None = all of them."""
        layer = self.layers[i]
        c, size, window = layer.n_chunks, layer.chunk_size, self.storage.window_len(layer)
        budget = self.budgets[i] if self.budgets else float("inf")
        if self.cfg.full_budget or c == 0 or (not self.cfg.is_auto and budget >= c * size + window):
            return None
        sinks = min(c, -(-self.cfg.sink_tokens // size))
        recent = min(c, max(0, -(-(self.cfg.recent_tokens - window) // size)))
        if self.cfg.is_auto:  # the selection decides how many, up to all of them
            return c, sinks, recent
        return min(c, max(int((budget - window) // size), sinks + recent + self.n_pinned[i])), sinks, recent

    def _select(self, i: int, q: torch.Tensor) -> list[torch.Tensor] | None:
        """Chunk indices (sorted) layer i attends to for query q (Hq, D): one list for all KV heads,
        or (per-head selection) one per KV head; None = all of them."""
        return self._select_layers(slice(i, i + 1), q[None])[0]

    def _select_ahead(self) -> None:
        """Every layer's chunks for this step at once, each with its last query (selects_ahead)."""
        self._chosen = self._select_layers(slice(None), torch.stack([x.q_last for x in self.layers]))

    def _chunks_read(self, i: int, chosen: list[torch.Tensor] | None) -> float:
        """How many of layer i's chunks a step with this selection reads, per KV head."""
        return self.layers[i].n_chunks if chosen is None else sum(map(len, chosen)) / len(chosen)

    def _select_layers(self, layers: slice, q: torch.Tensor) -> list[list[torch.Tensor] | None]:
        """_select for a run of layers at once, q (L, Hq, D) their queries: one batched selection."""
        ids = range(len(self.layers))[layers]
        plans = [self._plan(i) for i in ids]
        if all(plan is None for plan in plans):
            return [None] * len(ids)
        if self.scores_tokens:
            return [None if plan is None else self._select_by_tokens(i, query, plan) for i, query, plan in zip(ids, q, plans)]
        if mixed_attention.available():  # (selection.select_chunks is its oracle)
            rows = torch.tensor([(self.layers[i].n_chunks, *(plan or (-1, 0, 0))) for i, plan in zip(ids, plans)])
            chosen, n, estimated = mixed_attention.select(q, self.abstracts[layers], self.pinned[layers], rows,
                                                          self.temperatures[layers], self.cfg.coverage, self.per_head)
            groups = [[torch.from_numpy(row[: int(k)]) for row, k in zip(chosen[j], n[j])] for j in range(len(ids))]
        else:
            counts = [self.layers[i].n_chunks for i in ids]
            rows = [(c, c, 0, 0) if plan is None else (c, *plan) for c, plan in zip(counts, plans)]
            counts_t, keep, sinks, recent = torch.tensor(rows).T
            chosen, valid, estimated = select_chunks(q, self.abstracts[layers, :, :, : max(counts)], counts_t, keep, sinks,
                                                     recent, self.cfg.coverage, self.temperatures[layers], self.pinned[layers],
                                                     per_head=self.per_head)
            if not self.per_head:
                chosen, valid = chosen[:, None], valid[:, None]  # (L, 1 group, K)
            groups = [[group[: int(k)].sort().values for group, k in zip(chosen[j], valid[j].sum(-1))] for j in range(len(ids))]
        out = []
        for j, (i, plan) in enumerate(zip(ids, plans)):
            if plan is None:
                out.append(None)
                continue
            self.fidelity.promise(i, estimated[j])
            out.append(groups[j])
        return out

    def _select_by_tokens(self, i: int, q: torch.Tensor, plan: tuple[int, int, int]) -> list[torch.Tensor]:
        """Layer i's chunks for query q (Hq, D), ranked by its tokens' estimated scores
        (kernels/token_scores.py): one id list per KV head, or one for the layer."""
        layer, (keep, sinks, recent) = self.layers[i], plan
        least = self._least(i)
        slab = self.storage.slab(layer, 0)
        sketch = self.sketches[i]
        if (mixed_attention.available() and slab is not None and slab[0].dtype == torch.bfloat16
                and self.n_heads // self.n_kv <= 16):  # (token_scores is its oracle)
            chosen, estimated = mixed_attention.select_tokens(q, slab[0], sketch, layer.n, layer.n_chunks, layer.chunk_size,
                                                              self.pinned[i], keep, sinks, recent, least, self.cfg.coverage,
                                                              self.per_head, self.channels)
        else:
            window = self.storage.layer_kv(layer)[0][:, sketch.n :]
            masses, window = token_masses(q, sketch.keys(window), layer.n_chunks, layer.chunk_size, self.channels)
            forced = forced_chunks(layer.n_chunks, sinks, recent, self.pinned[i])
            picked = select_by_masses(masses, window, forced, keep, self.cfg.coverage, self.per_head, least)
            chosen, estimated = picked.chosen, picked.estimated
        self.fidelity.promise(i, estimated)
        return chosen

    def _least(self, i: int) -> int:
        """--kv-budget auto with token scores: the chunks layer i reads at least (its share of AUTO_FLOOR)."""
        if not (self.cfg.is_auto and self.scores_tokens and self.budgets):
            return 0
        layer = self.layers[i]
        return max(0, int((self.budgets[i] - self.storage.window_len(layer)) // layer.chunk_size)) if layer.chunk_size else 0

    def _select_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's chunks for this step, chosen at once with each layer's last query (a
        graph's views: one set per layer): chunk ids (L, K) and which of them count (L, K) (a
        layer whose budget covers all of its chunks keeps them all)."""
        chosen = self._select_layers(slice(None), torch.stack([layer.q_last for layer in self.layers]))  # (L, Hq, D)
        ids = [torch.arange(layer.n_chunks) if groups is None else groups[0] for layer, groups in zip(self.layers, chosen)]
        k = max((len(row) for row in ids), default=0)
        out, valid = torch.zeros(len(ids), k, dtype=torch.long), torch.zeros(len(ids), k, dtype=torch.bool)
        for row, layer_ids in enumerate(ids):
            out[row, : len(layer_ids)], valid[row, : len(layer_ids)] = layer_ids, True
        return out, valid

    def _step_budgets(self) -> None:
        """Per-layer budgets for this step: the average budget spread by the layers' shares
        (--kv-budget auto: under token scores the floor, AUTO_FLOOR of the context, that each layer
        reads at least; under bounds none, the selection sizes itself)."""
        if self.cfg.is_auto and not self.scores_tokens:
            return
        total = [layer.n_chunks * layer.chunk_size + self.storage.window_len(layer) for layer in self.layers]
        average = round(AUTO_FLOOR * self.length) if self.cfg.is_auto else self.cfg.budget_tokens(self.length)
        self.budgets = allocate([layer.share for layer in self.layers], average, total)

    def _begin_step(self) -> None:
        for i in range(len(self.layers)):  # the last step's tokens are verified now (see truncate)
            self._seal_full_window(i)
        self.counters["steps"] += 1
        self.storage.begin_step()
        self._step_budgets()

    def _count(self, i: int, chunks: int, attended: int) -> None:
        layer = self.layers[i]
        total = layer.n_chunks * layer.chunk_size + self.storage.window_len(layer)
        self.counters["tokens_attended"] += attended
        self.counters["tokens_total"] += total
        self.counters["chunks_selected"] += chunks
        self.fidelity.count(i, attended, total)

    def _seal_full_window(self, i: int) -> None:
        """Seal the window's oldest chunk when the window is two chunks long (one per step, as
        ever: a window that a many-token forward grew catches up over the next steps). Done when a
        step begins, not when the last one ended: until then a step's tokens can be rolled back."""
        layer = self.layers[i]
        if self.storage.window_len(layer) >= 2 * layer.chunk_size:
            keys, values = self.storage.seal(layer)
            self._add_abstracts(i, keys[:, None], values[:, None])

    # -- a graph attending through the cache natively (reads="through") ---------------------------
    def step_tables(self, t: int) -> StepTables | None:
        """A graph's decode step of t tokens (a draft being verified: more than one) attended from
        tables, no Python between its layers (mixed_attention.StepTables): every layer's chunks
        selected now with its last query, read where they live, as the mixed-bit op's rows (the
        window included, the step's own tokens not: the operator adds them). None: this step needs
        attend() per layer (prefill, chunk summaries, a head size the native kernel does not run)."""
        if not self.tables_apply(t):
            return None
        tables = StepTables(len(self.layers), self.n_kv, self.n_heads, self.head_dim, self.dtype, t)
        self.fill_tables(tables, list(range(len(self.layers))))
        return tables

    def tables_apply(self, t: int) -> bool:
        """Whether a step of t tokens can be attended from tables (step_tables)."""
        return (1 <= t <= STEP_TOKENS and self.selects_ahead and not self.summarize and self.layers[0].chunk_size > 0
                and mixed_attention.supports(self.head_dim) and self.cfg.op_provider is None)

    def fill_tables(self, tables: StepTables, at: list[int]) -> None:
        """step_tables' work for the step's tokens, this cache's layer j being the step's layer at[j] (a
        MixedCache's full-attention layers among its sliding ones). Layers in slabs (in RAM) are
        selected inside the step, each with its own last query, and read in place; tiered ones get
        their tables now, every layer's chunks selected with its last query."""
        self._begin_step()
        self._at = at
        self.storage.attention = mixed_attention.isas()[0]  # (what stats() reports ran)
        slabs = [self.storage.slab(layer, tables.tokens) for layer in self.layers]
        self._in_slabs = slabs[0] is not None
        if self._in_slabs:
            sampled = Fidelity.sampled(self.counters["steps"])
            plans = [self._plan(j) for j in range(len(self.layers))]
            self._selecting = [plan is not None for plan in plans]  # (end_step_tables: which layers promised a coverage)
            layers = zip(self.layers, slabs, plans, self.abstracts.unbind(0), self.pinned.unbind(0), self.temperatures.tolist())
            for j, (layer, (k, v), plan, abstracts, pinned, temperature) in enumerate(layers):
                channels = self.channels if self.scores_tokens else 0
                tables.set_slab(at[j], SlabStep(k, v, layer.n, layer.chunk_size, layer.n_chunks, abstracts, pinned, plan,
                                                temperature, self.cfg.coverage, self.per_head, sampled, channels, self._least(j),
                                                self.sketches[j]))
            return
        self._select_ahead()
        for j, rows in enumerate(self.storage.step_rows(self._chosen)):
            tables.set(at[j], rows)

    def end_step_tables(self, tables: StepTables, k: list[np.ndarray], v: list[np.ndarray]) -> None:
        """The step fill_tables() prepared ran: each layer's new tokens k, v (1, Hkv, T, D), listed
        by the step's layers, join its window (a slab has them already: k, v are then empty);
        its last query selects next step's chunks (its queries: a rollback's)."""
        sampled = not self.cfg.needs_homes and Fidelity.sampled(self.counters["steps"])
        at, t = self._at, tables.tokens
        queries = torch.from_numpy(tables.queries[at]).transpose(1, 2)  # (L, Hq, T, D): a copy (the step's buffers are reused)
        if self._in_slabs:
            tokens, chunks, estimated = (tables.read_layers(at, field).tolist() for field in ("tokens", "chunks", "estimated"))
            for part in ("select", "attend", "measure"):  # (seconds, in the counters: stats() reports them)
                self.counters[f"native_{part}_s"] += float(tables.read_layers(at, f"{part}_us").sum()) * 1e-6
        for j, layer in enumerate(self.layers):
            self.lengths[j] += t
            q = queries[j, :, -1]  # (Hq, D)
            layer.q_last, layer.q_tail = q, queries[j]
            if self._in_slabs:
                self.storage.slab_written(layer, t, tokens[j])
                if self._selecting[j]:
                    self.fidelity.promise(j, estimated[j])
                self._count(j, chunks[j], tokens[j])
                if sampled:
                    self.fidelity.measured(j, tables.captured_mass(at[j]))
                continue
            self.storage.append(layer, to_torch(k[at[j]])[0], to_torch(v[at[j]])[0])
            chosen = self._chosen[j]
            chunks = self._chunks_read(j, chosen)
            self._count(j, chunks, chunks * layer.chunk_size + self.storage.window_len(layer))
            if sampled:
                self._measure_read(j, q, chosen)

    # -- GraphCache: a whole-model graph (the ONNX backend), which attends itself -------------------
    def view(self, i: int, reserve: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
        """What layer i's next tokens attend to besides themselves: keys, values (1, Hkv, S, D) of
        which the first P slots count, and P (numpy arrays over the cache's own tensors). Prefill:
        every stored token. Decode: the chunks each layer's last query selects (consecutive queries
        are alike), chosen for all layers when layer 0 asks, and the window. In RAM the buffers have room for `reserve` more tokens after
        the P (a graph may write them there)."""
        layer = self.layers[i]
        if layer.chunk_size == 0:
            k, v, p = self.storage.prompt_view(layer, reserve)
        else:
            if i == 0:
                self._begin_step()
                self._views = self._graph_views(reserve)
            k, v, p = self._views[i]
        return to_numpy(k), to_numpy(v), p

    def _graph_views(self, reserve: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """This step's view of every layer, staged: only the chunks that enter a layer's selection
        are fetched (from the slab, or from the tiers) and copied."""
        chosen, valid = self._select_all()
        views = self.stages.update([self.storage.stage_source(i) for i in range(len(self.layers))], chosen, valid, reserve)
        kept = valid.sum(1).tolist()
        attended = 0
        for i, ((_, _, p), n) in enumerate(zip(views, kept)):
            self._count(i, n, p)
            attended += p
        self.storage.staged(chosen, kept, self.stages.incoming, attended)
        return views

    def positions(self, i: int) -> np.ndarray:
        """(A graph asks only for sliding layers' positions: a model with full layers keeps its
        sliding ones in windows, MixedCache; a model of sliding layers only tiers them all.)"""
        raise EdgetokError("the tiered KV cache does not track its tokens' positions: a model whose every layer "
                           "slides cannot run a prompt-pruning ONNX export with --kv-budget; run it without")

    def append(self, i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store the new tokens' k, v (1, Hkv, T, D); their queries q (1, Hq, T, D) steer selection."""
        self._store(i, to_torch(q), to_torch(k), to_torch(v))

    def _store(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        assert q.shape[0] == 1, "the tiered cache holds one sequence"
        layer = self.layers[i]
        self.lengths[i] += k.shape[2]
        q, k, v = q[0], k[0], v[0]
        layer.q_last, layer.q_tail = q[:, -1], q
        if layer.chunk_size == 0:
            self.storage.add_prompt(layer, k, v)
            self._observe(layer, q)
            return
        if self._views:
            staged_k, _, p = self._views[i]
            if k.data_ptr() == staged_k[0, :, p:].data_ptr():  # the graph wrote them after the window
                self.stages.wrote(i, k.shape[1])
        self.storage.append(layer, k, v)
        if self._views:  # what this step's query read: the view, then its own tokens
            self._measure(i, q[:, -1], torch.cat([staged_k[0, :, :p].float(), k.float()], 1))

    def advance(self, i: int, q: np.ndarray, n: int) -> None:
        layer = self.layers[i]
        # prefill: the view was the prompt's slab, the new tokens written after its P
        k, v, p = self.storage.prompt_view(layer, 0) if layer.chunk_size == 0 else self._views[i]
        assert p + n <= k.shape[2], "advance() past the view's room: append() the new tokens"
        self._store(i, to_torch(q), k[:, :, p : p + n], v[:, :, p : p + n])
