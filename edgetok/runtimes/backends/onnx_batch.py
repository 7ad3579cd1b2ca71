"""Batched decoding on an ONNX export: one graph run steps several sequences (BATCH).

The graph has a batch axis: input_ids (B, 1), past_length (B, L) per row and layer, and
GroupQueryAttention takes each row's own length. One run over B rows reads the weights once,
which is what a decode step on a CPU spends its time on, so B sequences cost far less than B runs.

The rows' K/V must be one tensor per layer, (B, Hkv, capacity, D). Each sequence keeps its own
exact cache (prefill, prompt reuse and the KV store work on it as for one sequence); while it
decodes in a batch its K/V is *resident* here: copied into a row once when it joins, written in
place by the graph each step, and copied back into its cache (the new tokens only) when it leaves
— before the backend does anything else with that cache. Rows stay packed: a leaving row's place
takes the last row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgetok.models import names
from edgetok.runtimes.kv import ContiguousCache

SLACK = 128  # spare slots per growth, as the single-sequence cache keeps (DECODE_SLACK)


@dataclass
class _Bound:
    binding: object
    ids: np.ndarray  # (B, 1) int64
    positions: np.ndarray  # (B, 1) int64
    past_length: np.ndarray  # (B, L) int64
    logits: np.ndarray  # (B, 1, V) float32
    keep_alive: list = field(default_factory=list)


class DecodeBatch:
    """The resident rows of one OnnxBackend's batched decoding."""

    def __init__(self, session, config, pruning: bool, forces: bool = False, positioned: list[int] | None = None) -> None:
        """forces: the graph takes names.PRUNE_FORCED; positioned: the layers whose slots' positions
        the graph reads (a pruning point before sliding layers: OnnxBackend.positioned); they all
        hold the same tokens."""
        self.session, self.config, self.pruning, self.forces = session, config, pruning, forces
        self.positioned = positioned or []
        c = config
        self.k: list[np.ndarray] = []  # per layer (R, Hkv, capacity, D) float32: R rows allocated
        self.v: list[np.ndarray] = []
        self.slot_positions = np.zeros((0, 0), np.int64)  # (R, capacity): the positioned layers' slots
        self.caches: list[ContiguousCache] = []  # row r's sequence
        self.stored = np.zeros((0, c.num_layers), np.int64)  # (R, L) tokens row r holds per layer
        self.joined = np.zeros((0, c.num_layers), np.int64)  # (R, L) of those, what its cache holds
        self.positions = np.zeros(0, np.int64)  # (R,) the position of row r's next token
        self._bindings: dict[int, _Bound] = {}  # by B, over the current buffers

    def __contains__(self, cache) -> bool:
        return any(c is cache for c in self.caches)

    def step(self, tokens: list[int], caches: list[ContiguousCache]) -> np.ndarray:
        """One graph run: tokens[b] after caches[b] → logits (B, V), in the caller's order."""
        for cache in [c for c in self.caches if not any(c is d for d in caches)]:
            self.release(cache)  # not in this step: the graph must not write its row
        for cache in caches:
            if cache not in self:
                self._join(cache)
        rows = [next(r for r, c in enumerate(self.caches) if c is cache) for cache in caches]
        b = len(self.caches)
        if int(self.stored.max(initial=0)) + 1 > self.capacity:
            self._grow(int(self.stored.max()) + 1 + SLACK)
        bound = self._binding(b)
        bound.ids[rows, 0] = tokens
        bound.positions[:, 0] = self.positions
        bound.past_length[:] = self.stored
        self.session.run_with_iobinding(bound.binding)
        if self.positioned:  # each row's new token now holds its next slot
            self.slot_positions[np.arange(b), self.stored[:, self.positioned[0]]] = self.positions
        self.stored += 1
        self.positions += 1
        return bound.logits[rows, 0].copy()  # (a copy: the bound array is the next step's too)

    def release(self, cache: ContiguousCache) -> None:
        """The row's new tokens back into its cache; the last row takes its place."""
        r = next((r for r, c in enumerate(self.caches) if c is cache), None)
        if r is None:
            return
        for i in range(self.config.num_layers):
            start, end = int(self.joined[r, i]), int(self.stored[r, i])
            if end > start:
                cache.append(i, None, self.k[i][r : r + 1, :, start:end], self.v[i][r : r + 1, :, start:end])
        last = len(self.caches) - 1
        if r != last:
            for i in range(self.config.num_layers):
                n = int(self.stored[last, i])
                self.k[i][r, :, :n] = self.k[i][last, :, :n]
                self.v[i][r, :, :n] = self.v[i][last, :, :n]
            self.slot_positions[r] = self.slot_positions[last]
            self.caches[r] = self.caches[last]
            for table in (self.stored, self.joined, self.positions):
                table[r] = table[last]
        self.caches.pop()
        self.stored, self.joined, self.positions = self.stored[:last], self.joined[:last], self.positions[:last]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def resident_bytes(self) -> int:
        return 2 * sum(t.nbytes for t in self.k)

    def _join(self, cache: ContiguousCache) -> None:
        views = [cache.view(i) for i in range(self.config.num_layers)]
        lengths = np.array([n for _, _, n in views], np.int64)
        r = len(self.caches)
        rows_needed = r + 1
        if rows_needed > (self.k[0].shape[0] if self.k else 0) or lengths.max() + 1 > self.capacity:
            self._grow(max(self.capacity, int(lengths.max()) + 1 + SLACK), rows=max(rows_needed, 2 * r))
        for i, (k, v, n) in enumerate(views):
            self.k[i][r, :, :n] = k[0, :, :n]
            self.v[i][r, :, :n] = v[0, :, :n]
        if self.positioned:
            first = self.positioned[0]
            self.slot_positions[r, : lengths[first]] = cache.positions(first)
        self.caches.append(cache)
        self.stored = np.vstack([self.stored, lengths[None]])
        self.joined = np.vstack([self.joined, lengths[None]])
        self.positions = np.append(self.positions, cache.length)

    def _grow(self, capacity: int, rows: int | None = None) -> None:
        """New buffers (rows, Hkv, capacity, D), the rows' tokens copied over; zeros elsewhere (the
        graph reads whole buffers and masks the spare slots: zeros are never NaN)."""
        c = self.config
        rows = max(rows or 0, self.k[0].shape[0] if self.k else 0)  # (never fewer: rows may hold sequences)
        for bufs in (self.k, self.v):
            for i in range(c.num_layers):
                new = np.zeros((rows, c.num_kv_heads, capacity, c.head_dim), dtype=np.float32)
                if i < len(bufs):
                    old = bufs[i]
                    n = min(old.shape[2], capacity)
                    new[: old.shape[0], :, :n] = old[:, :, :n]
                    bufs[i] = new
                else:
                    bufs.append(new)
        old = self.slot_positions
        self.slot_positions = np.zeros((rows, capacity), np.int64)
        self.slot_positions[: old.shape[0], : min(old.shape[1], capacity)] = old[:, :capacity]
        self._bindings.clear()  # they point into the old buffers

    def _binding(self, b: int) -> _Bound:
        """The binding for B rows over the current buffers: past and present are the same memory,
        so the graph writes each row's new K/V at its own slot."""
        if b in self._bindings:
            return self._bindings[b]
        c, layers = self.config, self.config.num_layers
        binding = self.session.io_binding()
        bound = _Bound(binding, np.zeros((b, 1), np.int64), np.zeros((b, 1), np.int64), np.zeros((b, layers), np.int64),
                       np.empty((b, 1, c.vocab_size), np.float32))

        def bind(kind: str, name: str, array: np.ndarray) -> None:
            getattr(binding, f"bind_{kind}")(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            bound.keep_alive.append(array)

        bind("input", names.INPUT_IDS, bound.ids)
        bind("input", names.POSITION_IDS, bound.positions)
        bind("input", names.PAST_LENGTH, bound.past_length)
        bind("input", names.LOGITS_TO_KEEP, np.array([1], np.int64))
        if self.pruning:
            bind("input", names.PRUNE_KEEP, np.ones(1, np.float64))  # one new token: every token kept
            bind("output", names.KEPT, np.empty((b, 1), np.int64))
        if self.forces:
            bind("input", names.PRUNE_FORCED, np.zeros((b, 1), bool))
        if self.positioned:
            bind("input", names.PAST_POSITIONS, self.slot_positions[:b])  # (the first B rows: contiguous)
        for i in range(layers):
            for kind, bufs in zip(names.KV_KINDS, (self.k, self.v)):
                rows = bufs[i][:b]  # (B, Hkv, capacity, D): the first B rows, contiguous
                bind("input", names.past(kind, i), rows)
                bind("output", names.present(kind, i), rows)
            bind("output", names.qkv(i), np.empty((b, 1, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim), np.float32))
        bind("output", names.LOGITS, bound.logits)
        self._bindings[b] = bound
        return bound
