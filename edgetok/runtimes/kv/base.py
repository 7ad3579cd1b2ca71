"""The protocol between the model and its KV cache."""

from __future__ import annotations

from typing import Protocol

import torch


class KVCache(Protocol):
    @property
    def length(self) -> int:
        """Tokens stored in every layer: the position of the next token."""
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
        number of tokens actually kept (a cache may keep fewer, down to 0)."""
        ...

    def end_prefill(self) -> None:
        """The prompt is in: a cache may reorganize it before decoding starts."""
        ...

    def stats(self) -> dict:
        """What the cache did, for --json output."""
        ...
