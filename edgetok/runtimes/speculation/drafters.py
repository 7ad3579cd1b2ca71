"""Drafters: cheap guesses of the next tokens, which the model then verifies in one forward.

Both are train-free and deterministic (a draft is a function of the tokens so far, so the
accept rule treats it as a one-hot proposal):

- PromptLookup: the longest recent n-gram that already occurred in the prompt or the output,
  and the tokens that followed it then (prompt lookup decoding; pays off when the output quotes
  or edits its input: summaries, document QA, code);
- TokenRecycling: a table of the candidate tokens the model itself ranked first after each token
  (Token Recycling, Luo et al.), followed as a chain from the last token. The paper drafts a
  static tree and verifies it with tree attention; edgetok verifies linear drafts: on the default
  engine a tree's extra nodes cost more than the tokens they add earn (benchmarks/
  speculative_costs.py replays lookup trees of 2-8 branches: 0.84-0.96x where the chain gets
  1.07x; BENCHMARKS.md), so the chain of first candidates is the draft.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Drafter(Protocol):
    def start(self, prompt: list[int]) -> None:
        """A new sequence begins with these tokens."""

    def extend(self, tokens: list[int]) -> None:
        """These tokens joined the sequence (generated and accepted)."""

    def propose(self, k: int) -> list[int]:
        """≤ k tokens likely to follow the sequence (none: no guess worth verifying)."""

    def learn(self, inputs: list[int], rows: np.ndarray) -> None:
        """The model's logits rows (T, V) after each of `inputs` (T tokens), just computed."""


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

    def learn(self, inputs: list[int], rows: np.ndarray) -> None:
        pass  # drafts come from the text alone


class TokenRecycling:
    """An adjacency table (V,) of the token the model ranked first after each token, the last
    time it ran on that token; -1 where it has not yet. The table outlives a sequence (the engine
    keeps the drafter): what the model said after a token in one answer often holds in the next.

    Before the model has run on a token, the token that followed it in the prompt stands in (the
    table's rows fill as decoding goes; a cold table would draft nothing for a while)."""

    def __init__(self, vocab_size: int) -> None:
        self.next = np.full(vocab_size, -1, dtype=np.int64)  # (V,): 8 bytes per token
        self.last = -1  # the sequence's last token

    def start(self, prompt: list[int]) -> None:
        ids = np.asarray(prompt, dtype=np.int64)
        cold = self.next[ids[:-1]] < 0
        self.next[ids[:-1][cold]] = ids[1:][cold]  # (the last of a repeated pair wins: fine for a seed)
        self.last = prompt[-1]

    def extend(self, tokens: list[int]) -> None:
        if tokens:
            self.last = tokens[-1]

    def propose(self, k: int) -> list[int]:
        draft, token = [], self.last
        for _ in range(k):
            token = int(self.next[token])
            if token < 0:
                break
            draft.append(token)
        return draft

    def learn(self, inputs: list[int], rows: np.ndarray) -> None:
        # every row counts, those after a rejected token too: a token's likely successor seldom
        # depends on how the model got to it (the paper recycles the whole tree's candidates)
        self.next[np.asarray(inputs)] = rows.argmax(-1)


DRAFTERS = ("lookup", "recycle")
