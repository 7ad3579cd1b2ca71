"""The torch backend: edgetok's reference model, K/V in an edgetok cache."""

from __future__ import annotations

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.fidelity import weights_effect
from edgetok.models.llama import LlamaModel
from edgetok.models.sources import Source
from edgetok.runtimes.backends.base import CACHE_ATTENTION, PREFIX_STATE, PRUNE, ROLLBACK, SEQUENCES, TREE, Progress
from edgetok.runtimes.choice import TORCH_WEIGHTS
from edgetok.runtimes.kv import AttendingCache, ContiguousCache, KVConfig, KVState, budgeted_cache
from edgetok.runtimes.prune import Pruned, PrunePlan, prefill_pruned
from edgetok.runtimes.speculation.tree import DraftTree


class TorchBackend:
    name = "torch"
    # no BATCH: a server runs its sequences' steps in turn (padding several caches' K/V per step
    # would copy them every step)
    capabilities = frozenset({PRUNE, PREFIX_STATE, ROLLBACK, SEQUENCES, CACHE_ATTENTION, TREE})
    prune_after_layer = None  # any layer: the plan's default
    min_draft = 1  # a forward of 2 tokens costs 1.04x one, of 4 1.54x (SmolLM2 fp32, 2 threads)
    node_cost = 0.1  # (of 8 tokens 1.82x one, of 16 2.04x: speculative_costs_torch_session17.json)

    WEIGHTS = TORCH_WEIGHTS

    def __init__(self, source: Source, weights: str = "fp32", kv: KVConfig | None = None) -> None:
        """weights: fp32 (the reference), bf16, or int8 (weight-only, bf16 activations)."""
        assert weights in self.WEIGHTS, weights
        self.config = source.config
        self.dtype = torch.float32 if weights == "fp32" else torch.bfloat16
        self.kv = kv  # None: the exact contiguous cache
        self.weights_fidelity = weights_effect(source, weights)
        self.model = LlamaModel.from_state_dict(source.config, source.weights, self.dtype, int8=weights == "int8")
        if weights != "fp32":  # the model holds converted copies: drop the float32 originals
            source.__dict__.pop("weights", None)

    def new_cache(self, kv: KVConfig | None = None) -> AttendingCache:
        c, kv = self.config, kv or self.kv
        if kv is not None:
            return budgeted_cache(kv, c.windows, c.num_heads, c.num_kv_heads, c.head_dim)
        return ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, dtype=self.dtype, windows=c.windows)

    @torch.inference_mode()
    def forward(self, tokens: list[int], cache: AttendingCache, last: int = 1) -> np.ndarray:
        """(last, V) float32: the model's logits, shared with numpy (no copy)."""
        return self.model(torch.tensor([tokens]), cache, last=last)[0].numpy()

    @torch.inference_mode()
    def forward_tree(self, tree: DraftTree, cache: AttendingCache) -> np.ndarray:
        if not cache.takes_trees:
            raise EdgetokError(cache.NO_TREES)
        positions = torch.from_numpy(cache.length + tree.depths)
        cache.tree = tree
        try:
            return self.model(torch.tensor([tree.tokens]), cache, positions=positions, last=None)[0].numpy()
        finally:
            cache.tree = None

    def keep_branch(self, cache: AttendingCache, tree: DraftTree, branch: list[int]) -> None:
        cache.keep_branch(cache.length - len(tree.tokens), branch)

    def forward_batch(self, tokens: list[int], caches: list[AttendingCache]) -> np.ndarray:
        raise EdgetokError("the torch backend runs one sequence per forward; batched decoding needs an ONNX export")

    def prefill_pruned(self, tokens: list[int], cache: AttendingCache, plan: PrunePlan, chunk: int,
                       progress: Progress | None = None) -> Pruned:
        return prefill_pruned(self.model, tokens, cache, plan, chunk, progress)

    def truncate(self, cache: AttendingCache, n: int) -> int:
        return cache.truncate(n)

    def end_prefill(self, cache: AttendingCache) -> None:
        cache.end_prefill()

    def cache_stats(self, cache: AttendingCache) -> dict:
        return cache.stats()

    def save_prefix(self, cache: AttendingCache) -> KVState:
        return cache.state

    def load_prefix(self, cache: AttendingCache, state: KVState) -> None:
        cache.state = state
