"""One speculative decode step: draft, verify the draft in one forward, roll back what failed."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgetok.runtimes.backends.base import Backend
from edgetok.runtimes.sampling import SamplingParams, sample
from edgetok.runtimes.speculation.control import DraftControl
from edgetok.runtimes.speculation.drafters import Drafter


class SpeculativeSteps:
    """Decode steps that verify drafts. Each step runs the last chosen token and a draft of k
    tokens in one forward (k + 1 logits rows), keeps the drafted tokens the accept rule takes,
    in order, up to the first it replaces, and drops the rest from the cache (truncate)."""

    def __init__(self, backend: Backend, cache: Any, cached_ids: list[int], drafter: Drafter, draft_max: int,
                 params: SamplingParams, seen: np.ndarray | None, generator: np.random.Generator, stats) -> None:
        """cached_ids: the engine's record of the tokens the cache holds, kept up to date here;
        stats: the generation's Stats, whose decode and draft counters this fills."""
        self.backend, self.cache, self.cached_ids = backend, cache, cached_ids
        self.drafter, self.control = drafter, DraftControl(draft_max, backend.min_draft)
        self.params, self.seen, self.generator, self.stats = params, seen, generator, stats
        self.known = 0  # generated tokens the drafter has been given

    def after(self, out_ids: list[int], room: int) -> list[int]:
        """out_ids: the tokens generated so far, the last one chosen but not yet run; → the next
        1 … room tokens (accepted drafts, then one the model chose)."""
        self.drafter.extend(out_ids[self.known :])
        self.known = len(out_ids)
        k = min(self.control.next_length(), room - 1)
        draft = self.drafter.propose(k) if k > 0 else []
        inputs = out_ids[-1:] + draft
        t0 = time.perf_counter()
        rows = self.backend.forward(inputs, self.cache, last=len(inputs))  # (1 + k, V)
        chosen = []
        for row, proposed in zip(rows, [*draft, None]):
            token = sample(row, self.params, self.seen, self.generator, draft=proposed)
            chosen.append(token)
            if token != proposed:
                break
            if self.seen is not None:  # the next row's repetition penalty counts it
                self.seen[token] = True
        accepted = len(chosen) - 1
        self.cached_ids.extend(inputs[: 1 + accepted])
        if accepted < len(draft):
            kept = self.backend.truncate(self.cache, len(self.cached_ids))
            assert kept == len(self.cached_ids), "a backend with ROLLBACK keeps the tokens before a rejected draft"
        self.drafter.learn(inputs, rows)
        self.stats.decode_steps += 1
        if draft:
            self.control.update(len(draft), accepted)
            self.stats.verify_s += time.perf_counter() - t0
            self.stats.verify_rounds += 1
            self.stats.drafted += len(draft)
            self.stats.accepted += accepted
        return chosen
