"""The torch backend: edgetok's reference model, K/V in an edgetok cache."""

from __future__ import annotations

import torch

from edgetok.models.llama import LlamaModel
from edgetok.models.sources import Source
from edgetok.runtimes.kv import ContiguousCache, KVCache, KVConfig, KVState, TieredCache
from edgetok.runtimes.prune import PrunePlan, Pruned, prefill_pruned


class TorchBackend:
    name = "torch"

    WEIGHTS = ("fp32", "bf16", "int8")

    def __init__(self, source: Source, weights: str = "fp32", kv: KVConfig | None = None) -> None:
        """weights: fp32 (the reference), bf16, or int8 (weight-only, bf16 activations)."""
        assert weights in self.WEIGHTS, weights
        self.config = source.config
        self.dtype = torch.float32 if weights == "fp32" else torch.bfloat16
        self.kv = kv  # None: the exact contiguous cache
        self.model = LlamaModel.from_state_dict(source.config, source.weights, self.dtype, int8=weights == "int8")
        if weights != "fp32":  # the model holds converted copies: drop the float32 originals
            source.__dict__.pop("weights", None)

    def new_cache(self) -> KVCache:
        c = self.config
        if self.kv is not None:
            return TieredCache(self.kv, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim)
        return ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, dtype=self.dtype, sliding_window=c.sliding_window)

    @torch.inference_mode()
    def forward(self, tokens: list[int], cache: KVCache) -> torch.Tensor:
        return self.model(torch.tensor([tokens]), cache)[0]

    def prefill_pruned(self, tokens: list[int], cache: KVCache, plan: PrunePlan, chunk: int, progress=None) -> Pruned:
        """The whole prompt into an empty cache, the layers after plan.after_layer on the kept tokens only."""
        return prefill_pruned(self.model, tokens, cache, plan, chunk, progress)

    def truncate(self, cache: KVCache, n: int) -> int:
        return cache.truncate(n)

    def end_prefill(self, cache: KVCache) -> None:
        cache.end_prefill()

    def cache_stats(self, cache: KVCache) -> dict:
        return cache.stats()

    def ingest(self, cache: KVCache, layers, q_obs) -> None:
        cache.state = KVState(layers, q_obs)

    def export(self, cache: KVCache) -> tuple[KVState]:
        return (cache.state,)  # the engine spreads it into store.save(prompt, state)
