"""Drafters: cheap guesses of the next tokens, which the model then verifies in one forward.

Both are train-free and deterministic (a draft is a function of the tokens so far, so the
accept rule treats it as a one-hot proposal):

- PromptLookup: the longest recent n-gram that already occurred in the prompt or the output,
  and the tokens that followed it then (prompt lookup decoding; pays off when the output quotes
  or edits its input: summaries, document QA, code);
- TokenRecycling: a table of the candidate tokens the model itself ranked highest after each
  token (Token Recycling, Luo et al.): followed as a chain of first candidates from the last token,
  or, with --draft-width W > 1, grown into a tree of the top-W candidates (the paper's static tree,
  verified with tree attention), its nodes spent where the branches are likeliest to hold.

A drafter proposes a chain (`propose`) or a tree (`propose_tree`); the steps ask for a tree only
where the backend and cache verify trees. Lookup's tree is its chain: its other matches rarely hold
the answer (benchmarks/speculative_costs.py replays lookup trees of 2-8 branches: their extra
nodes cost more than they earn; BENCHMARKS.md, session 17).
"""

from __future__ import annotations

import heapq
from typing import Protocol

import numpy as np

from edgetok.runtimes.speculation.tree import MAX_NODES, DraftTree


class Drafter(Protocol):
    def start(self, prompt: list[int]) -> None:
        """A new sequence begins with these tokens."""

    def extend(self, tokens: list[int]) -> None:
        """These tokens joined the sequence (generated and accepted)."""

    def propose(self, k: int) -> list[int]:
        """≤ k tokens likely to follow the sequence (none: no guess worth verifying)."""

    def propose_tree(self, k: int, width: int, floor: float) -> DraftTree:
        """A tree of ≤ k drafted tokens after the sequence's last (the root), each with ≤ width
        children, none whose estimated chance of being accepted is below `floor` (what verifying it
        costs, in decode steps); the root alone: no guess worth verifying."""

    def learn(self, inputs: list[int], rows: np.ndarray) -> None:
        """The model's logits rows (T, V) after each of `inputs` (T tokens: a chain, or a tree's nodes),
        just computed."""


class PromptLookup:
    """Drafts what followed the most recent earlier occurrence of the sequence's last n tokens,
    n from ngram_max down to ngram_min.

    An index per n maps each n-gram to the end of its latest occurrence that has a continuation,
    so a proposal is a few dict lookups however long the prompt is (updated as tokens arrive)."""

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.sizes = range(ngram_max, ngram_min - 1, -1)  # longest first: longer matches predict better
        self.tokens: list[int] = []
        self.index: dict[int, dict[tuple[int, ...], int]] = {}

    def start(self, prompt: list[int]) -> None:
        self.tokens = []
        self.index = {n: {} for n in self.sizes}
        self.extend(prompt)

    def extend(self, tokens: list[int]) -> None:
        seq = self.tokens
        for token in tokens:
            # the n-grams ending at the current last token now have a continuation: index them
            end = len(seq)
            for n, index in self.index.items():
                if end >= n:
                    index[tuple(seq[end - n : end])] = end
            seq.append(token)

    def propose(self, k: int) -> list[int]:
        seq = self.tokens
        for n, index in self.index.items():
            if len(seq) < n:
                continue
            end = index.get(tuple(seq[-n:]))
            if end is not None:
                return seq[end : end + k]  # (may run into the suffix itself: a repetition)
        return []

    def propose_tree(self, k: int, width: int, floor: float) -> DraftTree:
        return DraftTree.chain(self.tokens[-1], self.propose(min(k, MAX_NODES - 1)))

    def learn(self, inputs: list[int], rows: np.ndarray) -> None:
        pass  # drafts come from the text alone


class TokenRecycling:
    """An adjacency table (V, W) of the W tokens the model ranked highest after each token, best
    first, the last time it ran on that token; -1 where it has not yet. The table outlives a
    sequence (the engine keeps the drafter): what the model said after a token in one answer often
    holds in the next.

    Before the model has run on a token, the token that followed it in the prompt stands in as its
    first candidate (the table's rows fill as decoding goes; a cold table would draft nothing for a
    while).

    A tree's shape follows how often a candidate of each rank turned out to be the model's next
    choice (counted as rows arrive): its nodes go to the likeliest paths first, a product of those
    rates along each path, so a table whose first candidates usually hold grows a deep chain, and
    one whose second candidates often hold branches near the root; a path less likely than its
    node costs is not drafted. (SmolLM2's rates on the benchmark's prompts: the first candidate
    0.39-0.87, the second 0.02-0.11: its trees are mostly chains.)"""

    def __init__(self, vocab_size: int, width: int = 1) -> None:
        self.next = np.full((vocab_size, width), -1, dtype=np.int32)  # (V, W): 4·W bytes per token
        self.last = -1  # the sequence's last token
        self.tries = 0  # rows that arrived for a token whose candidates were known (counted for trees: W > 1)
        self.hits = np.zeros(width, np.int64)  # (W,): … whose rank-r candidate was the row's argmax

    def start(self, prompt: list[int]) -> None:
        ids = np.asarray(prompt, dtype=np.int64)
        cold = self.next[ids[:-1], 0] < 0
        self.next[ids[:-1][cold], 0] = ids[1:][cold]  # (the last of a repeated pair wins: fine for a seed)
        self.last = prompt[-1]

    def extend(self, tokens: list[int]) -> None:
        if tokens:
            self.last = tokens[-1]

    def propose(self, k: int) -> list[int]:
        draft, token = [], self.last
        for _ in range(k):
            token = int(self.next[token, 0])
            if token < 0:
                break
            draft.append(token)
        return draft

    def propose_tree(self, k: int, width: int, floor: float) -> DraftTree:
        width = min(width, self.next.shape[1])
        rates = (self.hits[:width] + 1) / (self.tries + 2)  # a rank's candidate is the next choice (Laplace)
        tokens, parents = [self.last], [-1]
        # best first by the path's probability: (−probability, order, parent node, rank)
        frontier = [(-rates[r], r, 0, r) for r in range(width)]
        heapq.heapify(frontier)
        order = width
        while frontier and len(tokens) <= min(k, MAX_NODES - 1):
            chance, _, parent, rank = heapq.heappop(frontier)
            if -chance < floor:  # the likeliest path left costs more than it would earn
                break
            token = int(self.next[tokens[parent], rank])
            if token < 0 or any(t == token and p == parent for t, p in zip(tokens, parents)):
                continue
            tokens.append(token)
            parents.append(parent)
            for r in range(width):
                heapq.heappush(frontier, (chance * rates[r], order, len(tokens) - 1, r))
                order += 1
        return DraftTree(tuple(tokens), tuple(parents))

    def learn(self, inputs: list[int], rows: np.ndarray) -> None:
        # every row counts, those after a rejected token too: a token's likely successor seldom
        # depends on how the model got to it (the paper recycles the whole tree's candidates)
        ids, width = np.asarray(inputs), self.next.shape[1]
        best = rows.argmax(-1)
        if width == 1:
            ranked = best[:, None]
        else:  # the top W of each row, best first
            top = np.argpartition(rows, -width, axis=-1)[:, -width:]
            ranked = np.take_along_axis(top, np.argsort(-np.take_along_axis(rows, top, -1), axis=-1), -1)
        if width > 1:  # (only a tree's shape needs the ranks' rates: no work per step for a chain)
            known = self.next[ids, 0] >= 0
            self.tries += int(known.sum())
            self.hits += (self.next[ids[known]] == best[known, None]).sum(0)
        self.next[ids] = ranked


DRAFTERS = ("lookup", "recycle")
