"""Next-token choice: repetition penalty, then greedy or temperature / top-k / top-p / min-p.

numpy only: every backend hands the engine float32 numpy logits, and the default engine runs
without torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output


def new_generator(seed: int) -> np.random.Generator:
    """The random stream one generation samples from (its seed makes it repeatable)."""
    return np.random.default_rng(seed)


def softmax(logits: np.ndarray) -> np.ndarray:
    """(V,) → probabilities (V,), in the logits' dtype; -inf logits get 0."""
    e = np.exp(logits - logits.max())
    return e / e.sum()


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty over the tokens marked in `seen` (V,) bool: shrink positive logits, grow negative."""
    with np.errstate(over="ignore", invalid="ignore"):  # an extreme penalty overflows: clamped below
        penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    big = np.finfo(logits.dtype).max  # an extreme penalty must not make ±inf (inf - inf is NaN in softmax)
    return np.where(seen, np.nan_to_num(penalized, nan=0.0, posinf=big, neginf=-big), logits)


def filter_logits(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Temperature-scaled logits (V,) with the tokens outside top-k / top-p / min-p set to -inf."""
    # shifted so the best is 0: a temperature near 0 sends the others to -inf, never inf / inf = NaN
    with np.errstate(over="ignore"):
        logits = (logits - logits.max()) / np.asarray(p.temperature, logits.dtype)
    if p.top_k > 0 and p.top_k < logits.size:
        kth = np.partition(logits, -p.top_k)[-p.top_k]
        logits = np.where(logits < kth, -np.inf, logits).astype(logits.dtype)
    if p.top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        probs = softmax(logits[order])
        drop = np.empty(logits.shape, bool)
        drop[order] = np.cumsum(probs) - probs >= p.top_p  # keep up to and incl. the crossing token
        logits = np.where(drop, -np.inf, logits).astype(logits.dtype)
    if p.min_p > 0.0:
        probs = softmax(logits)
        logits = np.where(probs < p.min_p * probs.max(), -np.inf, logits).astype(logits.dtype)
    return logits


def sample(
    logits: np.ndarray, p: SamplingParams, seen: np.ndarray | None, generator: np.random.Generator,
    drafts: Sequence[int] = (),
) -> int:
    """logits (V,) float32 → token id.

    drafts: drafted tokens to accept or replace (speculative decoding: one in a chain, a node's
    children in a tree); the result is distributed exactly as without them. A deterministic drafter
    proposes with q = one-hot(draft), so speculative sampling's rule accepts a draft with probability
    min(1, p(draft) / q(draft)) = p(draft) and else draws from the residual max(p − q, 0), normalized:
    p without the draft. Several drafts are tried in turn on the residual each leaves (SpecInfer's
    multi-draft rule): the token comes out distributed as p either way. Greedy: the argmax, which is a
    draft when a draft is right."""
    if p.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature < np.finfo(logits.dtype).tiny:  # 0, or a temperature the logits' dtype rounds to 0: greedy
        return int(np.argmax(logits))
    probs = softmax(filter_logits(logits, p)).astype(np.float64)
    left = 1.0  # the residual's mass
    for draft in drafts:
        if generator.random() * left < probs[draft]:
            return draft
        left -= probs[draft]
        probs[draft] = 0.0
    return int(generator.choice(probs.size, p=probs / probs.sum()))
