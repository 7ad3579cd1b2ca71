"""A draft with branches: several guesses of the next tokens verified in one forward (tree attention).

Node 0 is the root: the last chosen token, not yet run. Every other node is a drafted token that
follows its parent. In the verifying forward node i sits at position start + depth(i) and attends to
the cache and to its own ancestors only, so each node's logits are those a chain of its ancestors
would give. Afterwards one root-to-node branch is kept and the other nodes are dropped from the cache
(Backend.keep_branch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

MAX_NODES = 16  # a tree's nodes in one forward: the attention op's few-token path (kernels/attention_op.cpp)


@dataclass(frozen=True)
class DraftTree:
    tokens: tuple[int, ...]  # (N,): node i's token; node 0 the root
    parents: tuple[int, ...]  # (N,): node i's parent, an earlier node; −1 for the root

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not 1 <= n <= MAX_NODES or len(self.parents) != n:
            raise ValueError(f"a draft tree has 1 to {MAX_NODES} nodes, each with a parent; got {n} tokens, {len(self.parents)} parents")
        if self.parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(self.parents[1:], 1)):
            raise ValueError(f"a draft tree's root comes first and every other node after its parent: {self.parents}")
        siblings = {(p, t) for p, t in zip(self.parents[1:], self.tokens[1:])}
        if len(siblings) != n - 1:
            raise ValueError("a draft tree's siblings are distinct tokens (a repeated one would be verified twice)")

    @classmethod
    def chain(cls, root: int, draft: list[int]) -> DraftTree:
        """The root and a linear draft after it."""
        return cls((root, *draft), tuple(range(-1, len(draft))))

    @property
    def drafted(self) -> int:
        """Drafted tokens (the nodes but the root)."""
        return len(self.tokens) - 1

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    @cached_property
    def depths(self) -> np.ndarray:
        """(N,) int64: node i's distance from the root (its position after the root's)."""
        depth = np.zeros(len(self.parents), np.int64)
        for i, p in enumerate(self.parents[1:], 1):
            depth[i] = depth[p] + 1
        return depth

    @cached_property
    def visible(self) -> np.ndarray:
        """(N, N) bool: node i sees node j — j is i or one of its ancestors."""
        n = len(self.parents)
        sees = np.eye(n, dtype=bool)
        for i, p in enumerate(self.parents[1:], 1):
            sees[i] |= sees[p]
        return sees

    def children(self, node: int) -> list[int]:
        """The nodes whose parent is `node`, in order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def branch(self, node: int) -> list[int]:
        """The nodes from the root to `node`, root first."""
        path = [node]
        while self.parents[path[-1]] >= 0:
            path.append(self.parents[path[-1]])
        return path[::-1]
