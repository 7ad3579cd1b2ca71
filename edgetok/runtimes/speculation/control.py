"""How many tokens to draft next: more while drafts are accepted, fewer when they are not, and
none for a while after drafts keep missing, so that open-ended text pays little for drafting.

The decisions depend on acceptance counts only, never on time: sampling with a seed stays
reproducible (how much is drafted decides how the seeded generator is drawn from).
"""

from __future__ import annotations

from dataclasses import dataclass

# Verifying a draft of k tokens costs a forward of k + 1 tokens: on a CPU a little more than one
# decode step (every weight is read once either way), so a miss is cheap but not free.
MISSES_BEFORE_PAUSE = 2  # consecutive rounds that accept nothing
PAUSE_MIN, PAUSE_MAX = 4, 64  # decode steps without drafting; doubles while probes keep missing


@dataclass
class DraftControl:
    draft_max: int
    length: int = 1  # the next draft's length: it starts small and doubles while whole drafts pass
    paused: int = 0  # decode steps left without drafting
    pause: int = PAUSE_MIN  # the next pause's length
    misses: int = 0  # consecutive rounds that accepted nothing

    def next_length(self) -> int:
        """Tokens to draft at this decode step (0: decode plainly)."""
        if self.paused:
            self.paused -= 1
            return 0
        return self.length

    def update(self, drafted: int, accepted: int) -> None:
        """A verified round: grow while whole drafts pass, shrink to just past what passed."""
        self.length = min(self.draft_max, 2 * self.length) if accepted == drafted else accepted + 1
        if accepted:
            self.misses, self.pause = 0, PAUSE_MIN
            return
        self.misses += 1
        if self.misses >= MISSES_BEFORE_PAUSE:
            self.paused, self.pause, self.misses = self.pause, min(PAUSE_MAX, 2 * self.pause), 0
