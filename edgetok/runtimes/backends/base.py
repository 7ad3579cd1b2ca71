"""The protocol every backend implements: the engine calls these methods and nothing else.

A backend turns token ids into logits for one sequence whose K/V lives in a cache the backend
makes (`new_cache`). It speaks numpy at this boundary, so an engine without torch can drive it:
logits are float32 arrays, and a backend that computes in torch converts at its own edge
(`Tensor.numpy()` shares memory; nothing is copied).

What only some backends can do is declared as data in `capabilities`, never probed:
- PRUNE: `prefill_pruned` runs the later layers on a pruned prompt (--prune-prompt);
- PREFIX_STATE: `save_prefix` / `load_prefix` hand a prompt's K/V to the persistent KV store
  (--kv-store). Calling either without the capability raises EdgetokError.
- ROLLBACK: in decode, `truncate` keeps every token before the last forward's rejected ones
  (speculative decoding, --speculate), whatever the cache; without it a cache may start over.
- SEQUENCES: several caches live at once (`new_cache` leaves the others intact), so a server can
  keep several sequences; llama.cpp's backend has one context, and a new cache resets it.
- BATCH: `forward_batch` runs one token for each of several sequences in one forward, reading
  the weights once (`edgetok serve`'s continuous batching); without it a server runs them in turn.
- TREE: `forward_tree` verifies a draft tree in one forward (tree attention) on a cache whose
  `takes_trees` is true (the exact cache, but a pruned prompt's), and `keep_branch`
  keeps one of its branches; elsewhere speculative decoding drafts chains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgetok.models.config import ModelConfig
from edgetok.runtimes.kv import KVConfig, KVState
from edgetok.runtimes.prune import Pruned, PrunePlan

if TYPE_CHECKING:  # (speculation's steps import this protocol)
    from edgetok.runtimes.speculation.tree import DraftTree

PRUNE = "prune"
PREFIX_STATE = "prefix_state"
ROLLBACK = "rollback"
SEQUENCES = "sequences"
BATCH = "batch"
TREE = "tree"
CACHE_ATTENTION = "cache_attention"  # the KV cache computes attention itself (per-head selection, summaries)

Progress = Callable[[int], None]  # called with the number of prompt tokens just run


class Backend(Protocol):
    name: str
    config: ModelConfig
    capabilities: frozenset[str]
    # The layer a pruning backend prunes after when the user names none (an ONNX export prunes
    # only after the layer it was exported with); None: the plan's default.
    prune_after_layer: int | None
    # What the weights it runs cost against the fp32 model (edgetok/fidelity.py:weights_effect)
    weights_fidelity: dict
    # Drafted tokens a verifying forward runs for about the cost of one (--speculate never drafts
    # fewer once it verifies at all); benchmarks/speculative_costs.py measures the cost curve
    min_draft: int
    # TREE: a verifying forward's cost per drafted token, in decode steps: a draft tree takes a node
    # only where its chance of being accepted is at least this (benchmarks/speculative_costs.py)
    node_cost: float

    def new_cache(self, kv: KVConfig | None = None) -> Any:
        """An empty KV cache for one sequence, in whatever form forward() takes; kv: a tiered
        cache's settings for this sequence instead of the backend's own (a long prompt's)."""
        ...

    def forward(self, tokens: list[int], cache: Any, last: int = 1) -> np.ndarray:
        """Run `tokens` after what `cache` holds and store their K/V; → the logits of the last
        `last` of them, (last, V) float32 (speculative decoding verifies several at once)."""
        ...

    def forward_batch(self, tokens: list[int], caches: list[Any]) -> np.ndarray:
        """BATCH: token b after what caches[b] holds, for every b, in one forward → the logits of
        each, (B, V) float32; the same as forward([tokens[b]], caches[b]) for each b (distinct
        caches, each after its end_prefill)."""
        ...

    def forward_tree(self, tree: DraftTree, cache: Any) -> np.ndarray:
        """TREE: the tree's nodes after what `cache` holds (cache.takes_trees), node i at position
        length + depth(i), seeing the cache and its own ancestors → the logits of every node (N, V)."""
        ...

    def keep_branch(self, cache: Any, tree: DraftTree, branch: list[int]) -> None:
        """TREE: after forward_tree(tree, cache): keep the nodes of `branch` (root first), forget the rest."""
        ...

    def truncate(self, cache: Any, n: int) -> int:
        """Drop the cache's tokens from position n on (a reused prefix, a rejected draft); returns
        how many it kept (a cache may keep fewer, down to 0; with ROLLBACK, after end_prefill, all
        n when the dropped tokens came in the last forward)."""
        ...

    def end_prefill(self, cache: Any) -> None:
        """The prompt is in; decoding starts."""
        ...

    def cache_stats(self, cache: Any) -> dict:
        """What the cache did, for --json output."""
        ...

    def prefill_pruned(self, tokens: list[int], cache: Any, plan: PrunePlan, chunk: int,
                       progress: Progress | None = None) -> Pruned:
        """PRUNE: the whole prompt into an empty cache, the layers after plan.after_layer on the
        kept tokens only."""
        ...

    def save_prefix(self, cache: Any) -> KVState:
        """PREFIX_STATE: the prompt's K/V (before end_prefill), for the KV store."""
        ...

    def load_prefix(self, cache: Any, state: KVState) -> None:
        """PREFIX_STATE: take a stored prompt's K/V as an empty cache's first tokens."""
        ...
