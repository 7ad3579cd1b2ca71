"""Next-token choice: repetition penalty, then greedy or temperature / top-k / top-p / min-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty over the tokens marked in `seen` (V,) bool: shrink positive logits, grow negative."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    big = torch.finfo(logits.dtype).max  # an extreme penalty must not make ±inf (inf - inf is NaN in softmax)
    return torch.where(seen, penalized.nan_to_num(0.0, big, -big), logits)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits (V,) with the tokens outside top-k / top-p / min-p set to -inf."""
    # shifted so the best is 0: a temperature near 0 sends the others to -inf, never inf / inf = NaN
    logits = (logits - logits.max()) / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep up to and incl. the crossing token
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None, generator: torch.Generator,
    draft: int | None = None,
) -> int:
    """logits (V,) float32 → token id.

    draft: a drafted token to accept or replace (speculative decoding); the result is distributed
    exactly as without it. A deterministic drafter proposes with q = one-hot(draft), so speculative
    sampling's rule accepts it with probability min(1, p(draft) / q(draft)) = p(draft) and else
    draws from the residual max(p − q, 0), normalized: p without the draft. Greedy: the argmax,
    which is the draft when the draft is right."""
    if p.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature < torch.finfo(logits.dtype).tiny:  # 0, or a temperature the logits' dtype rounds to 0: greedy
        return int(torch.argmax(logits))
    probs = filter_logits(logits, p).softmax(-1)
    if draft is not None:
        if float(torch.rand((), generator=generator)) < float(probs[draft]):
            return draft
        probs[draft] = 0.0  # (multinomial normalizes)
    return int(torch.multinomial(probs, 1, generator=generator))
