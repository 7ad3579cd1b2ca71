"""How many tokens to draft next: more while drafts are accepted, fewer when they are not, and
none for a while after drafts keep missing, so that open-ended text pays little for drafting.

The decisions depend on acceptance counts only, never on time: sampling with a seed stays
reproducible (how much is drafted decides how the seeded generator is drawn from).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Verifying a draft of k tokens costs a forward of k + 1 tokens. On the default engine that is 1.20x
# a decode step for k = 1, 1.62x for k = 3 and 2.66x for k = 7 after a 1K-token prompt (session 17,
# BENCHMARKS.md): one accepted token pays for a round, and a miss costs a fifth of a step to one and
# a half steps (misses pause drafting, longer each time). A backend whose cheapest draft costs about
# two steps sets min_draft above 1: its drafts are never shorter, and a round must accept 2 tokens.
MISSES_BEFORE_PAUSE = 2  # consecutive rounds that do not pay, before the first pause
# Decode steps without drafting; doubles while probes keep missing. A probe that misses costs the
# default engine 0.18 of a step (session 17; 0.64 before): a pause of 16 keeps text that never
# matches within 1 % of plain decoding, and shorter pauses find the next quotable stretch sooner
# (replayed on the benchmark's ten prompts: lookup as before, recycle 1.06x → 1.10x on input-grounded
# prompts and 1.00x → 1.06x on open chat; benchmarks/speculative_costs.py, BENCHMARKS.md).
PAUSE_MIN, PAUSE_MAX = 2, 16


@dataclass
class DraftControl:
    draft_max: int
    min_draft: int = 1  # the backend's: drafted tokens that cost about what one does
    length: int = field(init=False)  # the next draft's length: doubles while whole drafts pass
    shortest: int = field(init=False)  # min_draft, or draft_max if that is less
    pays: int = field(init=False)  # accepted tokens a round needs to pay for its forward
    paused: int = 0  # decode steps left without drafting
    pause: int = PAUSE_MIN  # the next pause's length
    misses: int = 0  # consecutive rounds that did not pay
    backing_off: bool = False  # paused since the last round that paid: one more miss pauses again

    def __post_init__(self) -> None:
        self.length = self.shortest = min(self.min_draft, self.draft_max)
        # a backend whose verifying forward costs about one step (min_draft 1) is paid by one
        # accepted token; one whose cheap drafts cost about two steps' forward, by two
        self.pays = 1 if self.min_draft == 1 else 2

    def next_length(self) -> int:
        """Tokens to draft at this decode step (0: decode plainly)."""
        if self.paused:
            self.paused -= 1
            return 0
        return self.length

    def update(self, drafted: int, accepted: int) -> None:
        """A verified round: grow while whole drafts pass, shrink to just past what passed (never
        below min_draft); pause after rounds that do not pay."""
        self.length = min(self.draft_max, 2 * self.length) if accepted == drafted else max(self.shortest, accepted + 1)
        if accepted >= min(self.pays, drafted):
            self.misses, self.pause, self.backing_off = 0, PAUSE_MIN, False
            return
        self.misses += 1
        if self.misses >= MISSES_BEFORE_PAUSE or self.backing_off:
            self.paused, self.pause, self.misses = self.pause, min(PAUSE_MAX, 2 * self.pause), 0
            self.backing_off = True
