"""The protocol between the model and its KV cache."""

from __future__ import annotations

from typing import Protocol

import torch


class KVCache(Protocol):
    @property
    def length(self) -> int:
        """The position of the next token: every token the sequence has had, including prompt
        tokens that a pruned prefill stored only in the early layers (see `skip`)."""
        ...

    def skip(self, layer: int, n: int) -> None:
        """`layer` will never store n of the sequence's positions (prompt tokens pruned after an
        earlier layer): `length` counts them, the layer's stored tokens do not. Attention in that
        layer runs over what it stores, in order."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append the new tokens' k, v (B, Hkv, T, D) to `layer` and return the attention of
        q (B, Hq, T, D) over what the cache holds for that layer, causal among the T new tokens.

        A cache may attend over a subset of the stored tokens (a budget); an exact cache attends
        over all of them. Returns (B, Hq, T, D).
        """
        ...

    def truncate(self, n: int) -> int:
        """Forget every token from position n on (to reuse a shared prompt prefix); returns the
        number of tokens actually kept (a cache may keep fewer, down to 0; a pruned one keeps
        all or nothing)."""
        ...

    def end_prefill(self) -> None:
        """The prompt is in: a cache may reorganize it before decoding starts."""
        ...

    def stats(self) -> dict:
        """What the cache did, for --json output."""
        ...

    # -- for a backend whose graph attends itself (onnxruntime) --------------------------------------
    queries_read: int  # how many of a call's last tokens' queries append() reads (0: none; a budgeted cache selects with them)

    def view(self, layer: int, reserve: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What the layer's next tokens attend to besides themselves: keys, values (1, Hkv, S, D)
        of which the first P slots hold tokens, and P; at least `reserve` slots after P when the
        buffers are the cache's own (the graph may write the new tokens there)."""
        ...

    def append(self, layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' k, v (1, Hkv, T, D), which may already sit where view() said
        (then nothing is copied); q (1, Hq, ≥ min(T, queries_read), D): the last tokens' queries."""
        ...

    def advance(self, layer: int, q: torch.Tensor | None, n: int) -> None:
        """The layer's n new tokens' K/V are already in the buffers of its last view(), right
        after its P slots (the graph wrote them there): store them as append() would."""
        ...


# TEMPORARY shim until the kv split lands (arch-kv branch): the state protocol over ingest/export.
from dataclasses import dataclass  # noqa: E402


@dataclass
class KVState:
    layers: list
    queries: list | None = None


AttendingCache = GraphCache = KVCache


def _get_state(self):
    return KVState(*self.export())


def _set_state(self, state):
    self.ingest(state.layers, state.queries)


def add_state(cls):
    cls.state = property(_get_state, _set_state)
    return cls
