"""The speculative-decoding settings a GenerationConfig carries (`--speculate`, `--draft-max`, …)."""

from __future__ import annotations

from dataclasses import dataclass

from edgetok.errors import EdgetokError
from edgetok.runtimes.speculation.drafters import DRAFTERS

SPECULATE_CHOICES = ("none", *DRAFTERS)


@dataclass
class SpeculationParams:
    speculate: str = "none"  # none | lookup (n-grams of the prompt and output) | recycle (Token Recycling)
    draft_max: int = 8  # tokens drafted per step at most (fewer while drafts miss)
    lookup_ngram_min: int = 2  # the shortest n-gram that lookup matches (1 drafts often and misses often)
    lookup_ngram_max: int = 4  # the longest it tries first
    # children per drafted token at most: 1 drafts a chain; W > 1 drafts a tree (recycle: each token's
    # top-W candidates), verified with tree attention where the backend and its cache take trees
    draft_width: int = 1

    def check_speculation(self) -> None:
        """One sentence per mistake, naming the flag."""
        if self.speculate not in SPECULATE_CHOICES:
            raise EdgetokError(f"--speculate must be one of {', '.join(SPECULATE_CHOICES)}, not '{self.speculate}'")
        for name in ("draft_max", "lookup_ngram_min", "lookup_ngram_max", "draft_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise EdgetokError(f"--{name.replace('_', '-')} must be a whole number, not {value!r}")
        if self.draft_max < 1:
            raise EdgetokError(f"--draft-max must be ≥ 1 (tokens drafted per step), not {self.draft_max}")
        if self.draft_width < 1:
            raise EdgetokError(f"--draft-width must be ≥ 1 (1 drafts a chain, more a tree), not {self.draft_width}")
        if not 1 <= self.lookup_ngram_min <= self.lookup_ngram_max:
            raise EdgetokError(
                f"--lookup-ngram-min ({self.lookup_ngram_min}) must be ≥ 1 and ≤ --lookup-ngram-max ({self.lookup_ngram_max})"
            )
