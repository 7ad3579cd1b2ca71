"""The protocols between a model and its KV cache.

Two kinds of model drive a cache. A model that attends itself (the torch backend) hands each
layer's new q, k, v to `AttendingCache.attend` and gets the attention back. A whole-model graph
that attends inside itself (the onnxruntime backend) asks `GraphCache.view` for what each layer
attends to, runs, and hands the new tokens back through `append` or `advance`. Both share
`KVCache`: positions, truncation, the end of the prompt, statistics, and the saved state of a
prompt (what the persistent prompt store keeps; mlx-lm's caches save theirs the same way).

Every cache implements both protocols (a class per policy, as in mlx-lm's models/cache.py): the
model never probes which cache it has, and a class that lacks a method cannot be instantiated.

Arrays: AttendingCache speaks torch tensors (the torch model's); GraphCache and KVState speak
numpy, so a graph's backend and the prompt store run without torch. A cache whose policy computes
in torch (the tiered cache) shares its tensors with numpy at that edge (kv/arrays.py: no copy).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(eq=False)  # (arrays do not compare to one bool)
class KVState:
    """A prompt's K/V as a cache saves and loads it, numpy arrays of the cache's kv_dtype.

    layers: per layer (k, v), each (Hkv, M, D): the prompt's N tokens in order, or the last M of
    them (a sliding-window layer keeps only what its window can still see);
    q_obs: per layer the last prompt queries (Hq, ≤W, D) a cache measures its attention with at
    end_prefill, or None for a cache (or a layer) that needs none;
    starts: per layer the position of its first token (N − M; None: 0 for every layer);
    windows: per layer its sliding window, or None: a prefix of n tokens then needs its positions
    from n − window + 1 on (None: every layer holds all N).
    """

    layers: list[tuple[np.ndarray, np.ndarray]]
    q_obs: list[np.ndarray | None] | None = None
    starts: list[int] | None = None
    windows: list[int | None] | None = None

    def prefix(self, n: int) -> KVState | None:
        """The state of the first n tokens, or None when a layer no longer holds what they need."""
        starts = self.starts or [0] * len(self.layers)
        windows = self.windows or [None] * len(self.layers)
        if any(s > (0 if w is None else max(0, n - w + 1)) for s, w in zip(starts, windows)):
            return None
        layers = [(k[:, : n - s], v[:, : n - s]) for (k, v), s in zip(self.layers, starts)]
        return KVState(layers, self.q_obs, self.starts, self.windows)



class KVCache(ABC):
    """What every cache does, whichever model drives it."""

    # Whether a draft tree's nodes can run through this cache in one forward (speculative decoding's
    # tree attention: Backend.forward_tree), each seeing the cache and its own ancestors; one that can
    # says so and implements keep_branch. Elsewhere drafts are chains.
    takes_trees = False
    NO_TREES = ("--draft-width above 1 verifies draft trees only through the exact KV cache (not the tiered "
                "one, nor a pruned prompt's); this run drafts chains")

    def keep_branch(self, start: int, kept: list[int]) -> None:
        """A draft tree's nodes went in from position `start`: keep those at offsets `kept`
        (ascending, the root's 0 first) as positions start, start + 1, …, and forget the others."""
        raise TypeError(f"{type(self).__name__} takes no draft trees (takes_trees is False)")

    @property
    @abstractmethod
    def length(self) -> int:
        """The position of the next token: every token the sequence has had, including prompt
        tokens that a pruned prefill stored only in the early layers (see `skip`)."""

    @abstractmethod
    def skip(self, layer: int, n: int, kept: torch.Tensor) -> None:
        """`layer` will never store n of the sequence's positions (prompt tokens pruned after an
        earlier layer): `length` counts them, the layer's stored tokens do not. kept (K,) int64:
        the positions of the prompt tokens it does store, in order; called before it stores them.
        Attention in that layer runs over what it stores, in order; a sliding-window layer's
        window counts positions (kept), not stored tokens."""

    @abstractmethod
    def truncate(self, n: int) -> int:
        """Forget every token from position n on (to reuse a shared prompt prefix, or drop a
        rejected draft); returns the number of tokens actually kept (a cache may keep fewer, down
        to 0; after end_prefill, every cache keeps all n when the forgotten tokens came in the last
        forward)."""

    @abstractmethod
    def end_prefill(self) -> None:
        """The prompt is in: a cache may reorganize it before decoding starts."""

    @abstractmethod
    def stats(self) -> dict:
        """What the cache did, for --json output."""

    @property
    @abstractmethod
    def kv_dtype(self) -> np.dtype:
        """The dtype of the K/V attention reads (and of a saved state's arrays), as numpy names it
        (float32, or ml_dtypes' bfloat16)."""

    @property
    @abstractmethod
    def state(self) -> KVState:
        """The prompt held so far, read after prefill and before end_prefill (an unpruned prompt:
        a pruned one is no prefix anyone can reuse). The tensors may be views of the cache's own."""

    @state.setter
    @abstractmethod
    def state(self, state: KVState) -> None:
        """Load a saved prompt into this empty cache, as if it had been prefilled with it."""


class AttendingCache(KVCache):
    """For a model that attends itself (torch)."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append the new tokens' k, v (B, Hkv, T, D) to `layer` and return the attention of
        q (B, Hq, T, D) over what the cache holds for that layer, causal among the T new tokens.

        A cache may attend over a subset of the stored tokens (a budget); an exact cache attends
        over all of them. Returns (B, Hq, T, D).
        """


class GraphCache(KVCache):
    """For a whole-model graph that attends itself (onnxruntime): the cache hands out views."""

    @property
    @abstractmethod
    def queries_read(self) -> int:
        """How many of a call's last tokens' queries append() and advance() read (0: none; a
        budgeted cache selects with them)."""

    @abstractmethod
    def view(self, layer: int, reserve: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
        """What the layer's next tokens attend to besides themselves: keys, values (1, Hkv, S, D)
        of which the first P slots hold tokens, and P; at least `reserve` slots after P when the
        buffers are the cache's own (the graph may write the new tokens there)."""

    @abstractmethod
    def positions(self, layer: int) -> np.ndarray:
        """The positions (P,) int64 of the P tokens the layer's last view() holds, in slot order:
        consecutive, unless a pruned prompt left the layer its kept tokens (gaps) — what a graph
        masks a sliding window by."""

    @abstractmethod
    def append(self, layer: int, q: np.ndarray | None, k: np.ndarray, v: np.ndarray) -> None:
        """Store the new tokens' k, v (1, Hkv, T, D), which may already sit where view() said
        (then nothing is copied); q (1, Hq, ≥ min(T, queries_read), D): the last tokens' queries."""

    @abstractmethod
    def advance(self, layer: int, q: np.ndarray | None, n: int) -> None:
        """The layer's n new tokens' K/V are already in the buffers of its last view(), right
        after its P slots (the graph wrote them there): store them as append() would."""
