"""The protocol every backend implements; the engine knows nothing else about them."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from edgetok.models.config import ModelConfig


class Backend(Protocol):
    name: str
    config: ModelConfig

    def new_cache(self) -> Any:
        """An empty KV cache for one sequence, in whatever form forward() takes."""
        ...

    def forward(self, tokens: list[int], cache: Any) -> torch.Tensor:
        """Run `tokens` after what `cache` holds, store their K/V, return the last token's logits (V,) float32."""
        ...

    def truncate(self, cache: Any, n: int) -> int:
        """Drop the cache's tokens from position n on; returns how many it kept."""
        ...

    def end_prefill(self, cache: Any) -> None:
        """The prompt is in; decoding starts."""
        ...

    def cache_stats(self, cache: Any) -> dict:
        ...
