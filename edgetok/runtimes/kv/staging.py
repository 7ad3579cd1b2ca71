"""Stage buffers: the past a whole-model graph reads in decode, one buffer per layer, changed
only where the selection changes.

Layer l's buffer (1, Hkv, capacity, D) holds, in order:
- keep[l] slots of one chunk each (chunk_size[l] tokens), in no particular order — attention does
  not care, the keys carry their positions;
- the window: the layer's tokens after its last chunk;
- room for the step's new tokens, which the graph writes there itself.

Each step the selections of all layers arrive at once; a chunk that stays selected stays in its
slot, and only the chunks that enter the selection are fetched (from the slab in RAM, or from the
tiers: decompressed, perhaps read from disk) and copied. At 8K tokens and a 25 % budget about a
fifth of the selected chunks change per step (SmolLM2), so this moves ~5× less than gathering the
selection anew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Chunks = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # ids (n,) → K, V (Hkv, n, S·D)


@dataclass
class LayerKV:
    """What the stage needs of a layer: how it is cut, where its chunks come from, its window."""

    chunk_size: int
    n_chunks: int  # chunks sealed: the layer's tokens [0, n_chunks · chunk_size)
    chunks: Chunks  # the K/V of some of them, each chunk one row of S·D values per KV head
    window_k: torch.Tensor  # (Hkv, w, D): the tokens after the last chunk
    window_v: torch.Tensor


def slab_chunks(slab_k: torch.Tensor, slab_v: torch.Tensor, size: int) -> Chunks:
    """Chunks read from slabs (Hkv, capacity, D) whose capacity is a whole number of chunks."""
    hkv, _, d = slab_k.shape
    rows_k, rows_v = slab_k.view(hkv, -1, size * d), slab_v.view(hkv, -1, size * d)  # contiguous: a gather
    return lambda ids: (rows_k.index_select(1, ids), rows_v.index_select(1, ids))


class Stages:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.n_kv, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.bufs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.slot_chunk = torch.full((num_layers, 0), -1, dtype=torch.long)  # (L, slots): chunk in each slot, -1 empty
        # per layer: (stage offset, first token, tokens) of the window staged after the slots
        self.windows = [(0, 0, 0)] * num_layers
        self.incoming: list[torch.Tensor] = []  # the last update's fetched chunk ids, per layer

    def slots(self, layer: int) -> list[int]:
        """The chunk in each of the layer's slots (-1: none)."""
        return self.slot_chunk[layer].tolist()

    def update(self, layers: list[LayerKV], chosen: torch.Tensor, valid: torch.Tensor, reserve: int) -> list[tuple]:
        """chosen (L, K) chunk ids, the first keep[l] of row l valid (select_chunks' output) →
        per layer (k, v, P): the buffers (1, Hkv, capacity, D), whose first P slots are the chosen
        chunks and the window, with `reserve` free slots after them."""
        keep = valid.sum(1)  # (L,)
        keep_list = keep.tolist()
        for i, (layer, kept) in enumerate(zip(layers, keep_list)):
            self._room(i, kept * layer.chunk_size + layer.window_k.shape[1] + reserve, layer.chunk_size)
        slots = self._assign(chosen, valid, keep)
        self.incoming = [src for _, src in slots]
        out = []
        for i, (layer, kept, (dst, src)) in enumerate(zip(layers, keep_list, slots)):
            k, v = self.bufs[i]
            size = layer.chunk_size
            if len(dst):
                for buf, rows in zip((k, v), layer.chunks(src)):
                    buf[0, :, : kept * size].view(self.n_kv, kept, size * self.head_dim).index_copy_(1, dst, rows)
            out.append((k, v, self._window(i, layer, kept * size)))
        return out

    def wrote(self, layer: int, t: int) -> None:
        """The graph wrote the layer's t new tokens after its window, in place: they are staged."""
        offset, start, staged = self.windows[layer]
        self.windows[layer] = (offset, start, staged + t)

    def shorten_window(self, layer: int, w: int) -> None:
        """The layer's window now holds w tokens (a rollback): staged tokens past them are stale."""
        offset, start, staged = self.windows[layer]
        self.windows[layer] = (offset, start, min(staged, w))

    def reset(self) -> None:
        self.bufs = [None] * len(self.bufs)
        self.slot_chunk.fill_(-1)
        self.windows = [(0, 0, 0)] * len(self.windows)

    # -- internals ---------------------------------------------------------------------------------
    def _room(self, i: int, needed: int, size: int) -> None:
        """A buffer of at least `needed` slots; a new one holds nothing yet."""
        buf = self.bufs[i]
        if buf is not None and buf[0].shape[2] >= needed:
            return
        shape = (1, self.n_kv, needed + 2 * size + 64, self.head_dim)  # room for a few steps' growth
        self.bufs[i] = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        self.slot_chunk[i] = -1
        self.windows[i] = (0, 0, 0)

    def _assign(self, chosen: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Slots for this step's chunks, all layers at once: a chosen chunk already in one of the
        layer's first keep[l] slots stays there; the others fill the remaining slots. Returns per
        layer (slots, chunks) to copy."""
        n_layers, k = chosen.shape
        if self.slot_chunk.shape[1] < k:
            pad = torch.full((n_layers, k - self.slot_chunk.shape[1]), -1, dtype=torch.long)
            self.slot_chunk = torch.cat([self.slot_chunk, pad], 1)
        table = self.slot_chunk
        in_use = torch.arange(table.shape[1]) < keep[:, None]  # (L, slots)
        table.masked_fill_(~in_use, -1)
        dummy = int(chosen.max()) + 1 if chosen.numel() else 0  # a column for the entries that do not count
        wanted = torch.zeros(n_layers, dummy + 1, dtype=torch.bool)
        wanted.scatter_(1, torch.where(valid, chosen, dummy), True)
        wanted[:, dummy] = False
        occupant = table.clamp(min=0).clamp(max=dummy)
        stays = (table >= 0) & wanted.gather(1, occupant)  # (L, slots)
        placed = torch.zeros_like(wanted)
        placed.scatter_(1, torch.where(stays, occupant, dummy), True)
        placed[:, dummy] = False
        free_layer, free_slot = (in_use & ~stays).nonzero(as_tuple=True)  # row-major: by layer, then slot
        in_layer, in_chunk = (wanted & ~placed).nonzero(as_tuple=True)
        assert torch.equal(free_layer, in_layer), "each layer has as many free slots as incoming chunks"
        table[free_layer, free_slot] = in_chunk
        counts = torch.bincount(free_layer, minlength=n_layers).tolist()
        return list(zip(free_slot.split(counts), in_chunk.split(counts)))

    def _window(self, i: int, layer: LayerKV, offset: int) -> int:
        """Stage the window after the slots (only what is not there yet); → P, the slots in use."""
        k, v = self.bufs[i]
        start, w = layer.n_chunks * layer.chunk_size, layer.window_k.shape[1]
        staged_offset, staged_start, staged = self.windows[i]
        if (staged_offset, staged_start) != (offset, start):  # a seal, or more or fewer slots: all of it
            staged = 0
        if staged < w:
            k[0, :, offset + staged : offset + w] = layer.window_k[:, staged:]
            v[0, :, offset + staged : offset + w] = layer.window_v[:, staged:]
        self.windows[i] = (offset, start, w)
        return offset + w
