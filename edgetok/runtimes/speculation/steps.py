"""One speculative decode step: draft, verify the draft in one forward, roll back what failed."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgetok.runtimes.backends.base import TREE, Backend
from edgetok.runtimes.sampling import SamplingParams, sample
from edgetok.runtimes.speculation.control import DraftControl
from edgetok.runtimes.speculation.drafters import Drafter
from edgetok.runtimes.speculation.tree import MAX_NODES, DraftTree


class SpeculativeSteps:
    """Decode steps that verify drafts. Each step runs the last chosen token (the root) and a draft
    of k tokens — a chain, or a tree where the backend and cache verify trees — in one forward
    (1 + k logits rows), walks from the root through the drafted tokens the accept rule takes, up to
    the first it replaces, and drops the rest from the cache (truncate, or keep_branch for a tree)."""

    def __init__(self, backend: Backend, cache: Any, cached_ids: list[int], drafter: Drafter, draft_max: int,
                 draft_width: int, params: SamplingParams, seen: np.ndarray | None, generator: np.random.Generator,
                 stats) -> None:
        """cached_ids: the engine's record of the tokens the cache holds, kept up to date here;
        stats: the generation's Stats, whose decode and draft counters this fills."""
        self.backend, self.cache, self.cached_ids = backend, cache, cached_ids
        self.drafter, self.control = drafter, DraftControl(draft_max, backend.min_draft)
        # a tree needs the backend's tree attention and a cache that takes it; else chains
        self.width = draft_width if TREE in backend.capabilities and cache.takes_trees else 1
        self.params, self.seen, self.generator, self.stats = params, seen, generator, stats
        self.known = 0  # generated tokens the drafter has been given

    def after(self, out_ids: list[int], room: int) -> list[int]:
        """out_ids: the tokens generated so far, the last one chosen but not yet run; → the next
        1 … room tokens (accepted drafts, then one the model chose)."""
        self.drafter.extend(out_ids[self.known :])
        self.known = len(out_ids)
        k = min(self.control.next_length(), room - 1)
        if self.width > 1 and k > 0:
            tree = self.drafter.propose_tree(min(k * self.width, room - 1, MAX_NODES - 1), self.width, self.backend.node_cost)
            assert tree.tokens[0] == out_ids[-1], "a drafter's tree grows from the sequence's last token"
        else:
            tree = DraftTree.chain(out_ids[-1], self.drafter.propose(k) if k > 0 else [])
        t0 = time.perf_counter()
        if tree.is_chain:
            rows = self.backend.forward(list(tree.tokens), self.cache, last=len(tree.tokens))  # (N, V)
        else:
            rows = self.backend.forward_tree(tree, self.cache)  # (N, V)
        chosen, node = [], 0
        while True:
            children = tree.children(node)
            token = sample(rows[node], self.params, self.seen, self.generator, drafts=[tree.tokens[c] for c in children])
            chosen.append(token)
            child = next((c for c in children if tree.tokens[c] == token), None)
            if child is None:  # the model chose a token no draft had: it ends the step
                break
            node = child
            if self.seen is not None:  # the next row's repetition penalty counts it
                self.seen[token] = True
        branch = tree.branch(node)  # the root and the accepted drafted tokens
        accepted = len(branch) - 1
        self.cached_ids.extend(tree.tokens[i] for i in branch)
        if not tree.is_chain:
            self.backend.keep_branch(self.cache, tree, branch)
        elif accepted < tree.drafted:
            kept = self.backend.truncate(self.cache, len(self.cached_ids))
            assert kept == len(self.cached_ids), "a backend with ROLLBACK keeps the tokens before a rejected draft"
        self.drafter.learn(list(tree.tokens), rows)
        self.stats.decode_steps += 1
        if tree.drafted:
            self.control.update(int(tree.depths.max()), accepted)
            self.stats.verify_s += time.perf_counter() - t0
            self.stats.verify_rounds += 1
            self.stats.drafted += tree.drafted
            self.stats.accepted += accepted
        return chosen
