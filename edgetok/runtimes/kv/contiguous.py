"""The exact cache: every token's K/V in one growing buffer per layer.

Its buffers are numpy arrays: a graph (ONNX Runtime) binds them without torch. The torch model's
`attend` shares them as tensors (kv/arrays.py: no copy).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from edgetok.runtimes.kv.arrays import numpy_dtype, to_numpy, to_torch
from edgetok.runtimes.kv.base import AttendingCache, GraphCache, KVState

if TYPE_CHECKING:
    import torch

    from edgetok.runtimes.speculation.tree import DraftTree


class ContiguousCache(AttendingCache, GraphCache):
    """Full attention over all stored tokens. Capacity grows by a quarter as needed (amortized O(1) append)."""

    queries_read = 0  # append() ignores q: a graph's backend need not hand its queries over
    ROLLBACK = 64  # tokens a compacted sliding layer keeps beyond its window (more than a draft)
    # While a draft tree runs through the torch model (TorchBackend.forward_tree): its nodes are the new
    # tokens (each sees its ancestors, at position root + depth); None: each sees those before it
    tree: DraftTree | None = None

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        batch: int = 1,
        capacity: int = 256,
        dtype=np.float32,
        windows: list[int | None] | None = None,
        growth: float = 0.25,
        slack: int = 256,
        compact_every: int | None = None,
    ) -> None:
        """dtype: of the K/V, numpy's or torch's name for it (float32, bfloat16);
        growth, slack: a full buffer grows to max(needed + slack, capacity · (1 + growth));
        compact_every: a sliding layer drops the tokens its window no longer sees once it holds this
        many more than it keeps (a graph's cache: its attention then reads about a window of slots,
        not the whole context, and the buffer stays that small); None: every layer keeps every token."""
        shape, dtype = (batch, num_kv_heads, capacity, head_dim), numpy_dtype(dtype)
        # Zeros, not garbage: a graph reads whole buffers and masks the spare slots (see view()).
        self.k = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.growth, self.slack = growth, slack
        self.lengths = [0] * num_layers  # tokens stored per layer
        self.starts = [0] * num_layers  # the position slot 0 holds (> 0 once a sliding layer dropped tokens)
        self.compact_every = compact_every
        self.skipped = [0] * num_layers  # positions a layer never stores (pruned prompt tokens)
        # per layer: attention sees the last `window` positions (sliding layers), or None: all of them
        self.windows = windows or [None] * num_layers
        # per sliding layer of a pruned prompt: the kept positions (numpy or torch: whichever model
        # ran), which its first stored slots hold (its window counts positions, not stored tokens);
        # None: slot j holds position j + skipped
        self.kept: list[np.ndarray | torch.Tensor | None] = [None] * num_layers
        self.decode_start: float = math.inf  # the position from which every layer stores every token

    @property
    def length(self) -> int:
        return self.starts[-1] + self.lengths[-1] + self.skipped[-1]

    def skip(self, layer: int, n: int, kept: torch.Tensor) -> None:
        self.skipped[layer] += n
        if self.windows[layer] is not None:
            self.kept[layer] = kept

    def positions(self, layer: int) -> np.ndarray:
        """The positions (N,) of the layer's N stored tokens: the kept ones of a pruned prompt, then
        consecutive ones."""
        pos = np.arange(self.lengths[layer], dtype=np.int64) + self.skipped[layer] + self.starts[layer]
        kept = self.kept[layer]
        if kept is not None:
            pos[: len(kept)] = np.asarray(kept[: len(pos)])
        return pos

    @property
    def takes_trees(self) -> bool:
        """Every layer stores every token at consecutive positions (not a pruned prompt, whose gaps a
        sliding window would have to count around a tree's shared positions)."""
        return not any(self.skipped)

    def keep_branch(self, start: int, kept: list[int]) -> None:
        assert self.takes_trees and start + kept[-1] < self.length, (start, kept, self.length)
        for i, first in enumerate(self.starts):  # (a compacted sliding layer's slot 0 holds position `first`)
            slot = start - first
            at = slot + np.asarray(kept)
            for buf in (self.k[i], self.v[i]):
                buf[:, :, slot : slot + len(kept)] = buf[:, :, at]  # (the fancy index copies first)
            self.lengths[i] = slot + len(kept)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return 2 * sum(k[:, :, :n].nbytes for k, n in zip(self.k, self.lengths))

    def _grow(self, layer: int, needed: int) -> None:
        cap = self.k[layer].shape[2]
        new_cap = max(needed + self.slack, cap + int(cap * self.growth))
        for bufs in (self.k, self.v):
            old = bufs[layer]
            new = np.zeros(old.shape[:2] + (new_cap,) + old.shape[3:], dtype=old.dtype)
            new[:, :, :cap] = old
            bufs[layer] = new

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        import torch

        from edgetok.kernels.attention import attend, causal_mask, position_mask  # (torch: only a torch model calls this)

        self.append(layer, to_numpy(q), to_numpy(k), to_numpy(v))  # (append as the graph protocol has it)
        end = self.lengths[layer]
        if self.kept[layer] is not None:  # a pruned prompt's sliding layer: its window counts positions
            pos = to_torch(self.positions(layer))
            mask = position_mask(pos[end - k.shape[2] :], pos, self.windows[layer])
        elif self.tree is not None:  # a draft tree's nodes: the past (a window's, from each node's position), their ancestors
            t, window = k.shape[2], self.windows[layer]
            mask = torch.ones(t, end, dtype=torch.bool)
            mask[:, end - t :] = torch.from_numpy(self.tree.visible)
            if window is not None:
                stored = torch.from_numpy(self.positions(layer))  # (end,): the root's position at end − t
                depths = torch.from_numpy(self.tree.depths)
                at = stored[end - t] + depths  # (t,) the nodes' positions
                mask[:, : end - t] = stored[None, : end - t] > at[:, None] - window
                mask[:, end - t :] &= depths[None, :] > depths[:, None] - window
        else:
            mask = causal_mask(k.shape[2], end, self.windows[layer], device=q.device)
        return attend(q, to_torch(self.k[layer][:, :, :end]), to_torch(self.v[layer][:, :, :end]), mask)

    # -- for a whole-model graph (the ONNX backend), which attends itself --------------------------
    def view(self, layer: int, reserve: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
        """The layer's whole buffers (B, Hkv, capacity, D), with room for `reserve` more tokens, and
        how many leading slots hold tokens: no copy per step; the graph masks the spare slots
        (zeros, so never NaN) or writes the new tokens into them."""
        self._compact(layer)
        end = self.lengths[layer] + reserve
        if end > self.k[layer].shape[2]:
            self._grow(layer, end)
        return self.k[layer], self.v[layer], self.lengths[layer]

    def _compact(self, layer: int) -> None:
        """A sliding layer holding compact_every tokens more than it keeps moves the kept ones to the
        front (one copy per compact_every tokens) and, if its buffer is far larger than that (after a
        long prefill), gives the rest back. It keeps its window and ROLLBACK more (speculative
        decoding's rejected drafts are rolled back without a new prefill)."""
        window, n = self.windows[layer], self.lengths[layer]
        if self.compact_every is None or window is None or self.skipped[layer] or self.kept[layer] is not None:
            return
        keep = window - 1 + self.ROLLBACK
        if n <= keep + self.compact_every:
            return
        drop, cap = n - keep, self.k[layer].shape[2]
        size = keep + self.compact_every + self.slack
        for bufs in (self.k, self.v):
            old = bufs[layer]
            if cap > 2 * size:
                bufs[layer] = np.zeros(old.shape[:2] + (size,) + old.shape[3:], dtype=old.dtype)
            bufs[layer][:, :, :keep] = old[:, :, drop:n]  # (numpy copies overlapping ranges safely)
        self.starts[layer] += drop
        self.lengths[layer] = keep

    def append(self, layer: int, q: np.ndarray | None, k: np.ndarray, v: np.ndarray) -> None:
        """Store the new tokens' k, v (B, Hkv, T, D) after the layer's tokens."""
        start, t = self.lengths[layer], k.shape[2]
        end = start + t
        if end > self.k[layer].shape[2]:
            self._grow(layer, end)
        for buf, new in ((self.k[layer], k), (self.v[layer], v)):
            dst = buf[:, :, start:end]
            if dst.ctypes.data != new.ctypes.data:  # a graph bound to view()'s buffers wrote them in place
                dst[...] = new
        self.lengths[layer] = end

    def advance(self, layer: int, q: np.ndarray | None, n: int) -> None:
        """The graph wrote n tokens in place after the layer's tokens (its view is the buffer itself)."""
        assert self.lengths[layer] + n <= self.k[layer].shape[2]
        self.lengths[layer] += n

    def truncate(self, n: int) -> int:
        assert 0 <= n <= self.length, (n, self.length)
        if any(self.skipped) and n < self.decode_start:
            n = 0  # which pruned tokens lie before n differs per layer: start over
        behind = [s for s, w in zip(self.starts, self.windows) if s and s > max(0, n - w + 1)]
        if behind:
            n = 0  # a sliding layer dropped tokens position n's window needs: start over
        if n == 0:
            self.lengths, self.skipped, self.decode_start = [0] * len(self.lengths), [0] * len(self.skipped), math.inf
            self.kept, self.starts = [None] * len(self.kept), [0] * len(self.starts)
        elif n < self.length:  # every layer stores the dropped tokens, last (a pruned prompt's decode too)
            self.lengths = [m - (self.length - n) for m in self.lengths]
        return n

    def end_prefill(self) -> None:
        self.decode_start = self.length  # every layer stores every token from here on

    kv_dtype = property(lambda self: self.k[0].dtype)

    @property
    def state(self) -> KVState:
        """Every layer's K/V (Hkv, N, D) as views, and no observation queries."""
        assert not any(self.skipped), "a pruned prompt's K/V is not a prefix anyone can reuse"
        layers = [(self.k[i][0, :, : self.lengths[i]], self.v[i][0, :, : self.lengths[i]]) for i in range(len(self.k))]
        if not any(self.starts):
            return KVState(layers)
        return KVState(layers, starts=list(self.starts), windows=list(self.windows))

    @state.setter
    def state(self, state: KVState) -> None:
        """Take stored K/V ((Hkv, N, D) per layer) as this cache's first N tokens."""
        assert self.length == 0
        self.starts = list(state.starts or [0] * len(self.k))
        for i, (k, v) in enumerate(state.layers):
            n = k.shape[1]
            if n > self.k[i].shape[2]:
                self._grow(i, n)
            self.k[i][0, :, :n] = k
            self.v[i][0, :, :n] = v
            self.lengths[i] = n

    def stats(self) -> dict:
        return {"kind": "contiguous", "resident_bytes": {"device": self.nbytes()}}
