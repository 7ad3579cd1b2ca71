"""Decisions from measured attention: chunk size and token budget per layer, bit width per chunk."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetok.kernels.pruning import received, window_attention

MASS = 0.9  # a layer's spread: the share of tokens that holds this much of its attention


@dataclass
class Profile:
    spread: float  # fraction of the context needed to cover MASS of the attention (0..1]
    importance: torch.Tensor  # (N,) attention each token receives (mean over queries, max over heads)
    attention: torch.Tensor  # (Hq, W, N) the observation queries' attention


def attention_profile(q_obs: torch.Tensor, keys: torch.Tensor) -> Profile:
    """q_obs (Hq, W, D): the last W prompt queries; keys (Hkv, N, D): the layer's whole prompt."""
    w, n = q_obs.shape[1], keys.shape[1]
    p = window_attention(q_obs, keys)  # (Hq, W, N)
    sorted_p = p.sort(-1, descending=True).values
    needed = (sorted_p.cumsum(-1) < MASS).sum(-1) + 1  # (Hq, W) tokens to reach MASS
    visible = torch.arange(n - w + 1, n + 1).clamp(max=n)  # keys each observation query can see
    spread = (needed.float() / visible.float()).mean().item()
    return Profile(spread=spread, importance=received(p), attention=p)


PIN_SHARE = 1 / 16  # of a layer's prompt chunks, always read in decode (pinned_chunks)


def pinned_chunks(attention: torch.Tensor, chunk_size: int, count: int, sinks: int) -> torch.Tensor:
    """The prompt chunks that decode always reads: those the observation window (the question
    at the prompt's end) attended to most — the strongest attention any of its queries, in any
    head, gave a token of the chunk (as SnapKV keeps what the window looks at). A fact the
    question asks for draws one retrieval head's attention, which a budget chosen by bounds at
    each step can miss. attention (Hq, W, N) → chunk ids (≤ PIN_SHARE of the count chunks). The
    sinks and the window itself (read anyway) do not compete."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    top = attention.amax(0).amax(0)  # (N,)
    top[:sinks] = 0
    top[top.shape[0] - attention.shape[1] :] = 0
    top = top[: count * chunk_size].reshape(count, chunk_size).amax(-1)  # (C,)
    return top.topk(max(1, round(PIN_SHARE * count))).indices


def chunk_size_for(spread: float, sizes: tuple[int, ...]) -> int:
    """Concentrated layers get small chunks (fine selection), diffuse ones large (fewer, longer reads)."""
    small, mid, large = sizes[0], sizes[len(sizes) // 2], sizes[-1]
    return small if spread < 0.15 else mid if spread < 0.35 else large


def layer_shares(spreads: list[float]) -> list[float]:
    """Per-layer budget multipliers (mean 1): layers whose attention is spread get more tokens."""
    w = [max(s, 0.02) for s in spreads]
    mean = sum(w) / len(w)
    return [x / mean for x in w]


def allocate(shares: list[float], average: float, caps: list[int]) -> list[float]:
    """Per-layer token budgets in proportion to `shares`, averaging `average`, none above its cap;
    what a capped layer cannot use goes to the others (water-filling)."""
    budgets = [0.0] * len(shares)
    remaining, free = average * len(shares), set(range(len(shares)))
    while free:
        total = sum(shares[i] for i in free)
        capped = {i for i in free if remaining * shares[i] / total >= caps[i]}
        if not capped:
            for i in free:
                budgets[i] = remaining * shares[i] / total
            break
        for i in capped:
            budgets[i] = caps[i]
            remaining -= caps[i]
        free -= capped
    return budgets


def bits_by_importance(importance: list[float], choice: str) -> list[int]:
    """auto: the top quarter of chunks at 16 bits, the middle half at 8, the bottom quarter at 4."""
    n = len(importance)
    if choice != "auto":
        return [int(choice)] * n
    order = sorted(range(n), key=lambda i: -importance[i])
    bits = [8] * n
    for rank, i in enumerate(order):
        bits[i] = 16 if rank < n / 4 else 8 if rank < 3 * n / 4 else 4
    return bits
