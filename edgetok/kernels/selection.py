"""Chunk scoring from key abstracts: an upper bound of q·k over a chunk, without reading it.

For a chunk with element-wise key minimum m and maximum M (per KV head), and a query q,

    max_k q·k ≤ Σ_d max(q_d·m_d, q_d·M_d) = Σ_d (q_d⁺·M_d + q_d⁻·m_d),

so one matmul of [q⁺, q⁻] against the stacked abstracts [M; m] bounds every chunk at once, and
one more batch dimension bounds every layer's chunks at once (a graph backend selects all layers
together, with the queries of its previous step).
"""

from __future__ import annotations

import math

import torch


def key_abstracts(k: torch.Tensor) -> torch.Tensor:
    """k (Hkv, C, S, D): C chunks of S tokens → abstracts (Hkv, 2D, C): max then min over each chunk."""
    return torch.cat([k.amax(2), k.amin(2)], -1).transpose(1, 2).contiguous()


def chunk_upper_bounds(q: torch.Tensor, abstracts: torch.Tensor) -> torch.Tensor:
    """q (..., Hq, D); abstracts (..., Hkv, 2D, C) → (..., Hkv, C) bounds of q·k / sqrt(D), max
    over the query heads that share each KV head."""
    *lead, hkv, two_d, _ = abstracts.shape
    d = two_d // 2
    qg = q.reshape(*lead, hkv, -1, d).float()  # (..., Hkv, G, D)
    qq = torch.cat([qg.clamp(min=0), qg.clamp(max=0)], -1)  # (..., Hkv, G, 2D)
    return torch.matmul(qq, abstracts.float()).amax(-2) / math.sqrt(d)


def chunk_upper_bounds_reference(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """The definition, term by term: q (Hq, D), kmin/kmax (C, Hkv, D) → (Hkv, C)."""
    c, hkv, d = kmin.shape
    qg = q.view(hkv, -1, d)[None]  # (1, Hkv, G, D)
    terms = torch.maximum(qg * kmin[:, :, None], qg * kmax[:, :, None])  # (C, Hkv, G, D)
    return (terms.sum(-1).amax(-1) / math.sqrt(d)).T


def chunk_scores(q: torch.Tensor, abstracts: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """(..., C) the attention mass each chunk may hold, at most, for the head that wants it most.

    Per KV head, a softmax over chunks of the bounds estimates the share of that head's attention a
    chunk can take (a layer's chunks share one length); the score is the max over heads, so a
    chunk one head needs is kept even if the others ignore it. counts (...,): with a batch of
    layers, how many leading columns are each layer's chunks (the rest score -inf).
    """
    bounds = chunk_upper_bounds(q, abstracts)  # (..., Hkv, C)
    if counts is not None:
        padding = torch.arange(bounds.shape[-1]) >= counts[..., None]  # (..., C)
        bounds = bounds.masked_fill(padding[..., None, :], float("-inf"))
    scores = bounds.softmax(-1).amax(-2)
    return scores if counts is None else scores.masked_fill(padding, float("-inf"))


def select_chunks(
    q: torch.Tensor, abstracts: torch.Tensor, counts: torch.Tensor, keep: torch.Tensor,
    sinks: torch.Tensor, recent: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's chunks to attend to, for all layers at once.

    q (L, Hq, D); abstracts (L, Hkv, 2D, C) whose first counts[l] columns are layer l's chunks;
    keep, sinks, recent (L,) int64 with sinks + recent ≤ keep ≤ counts. Layer l keeps its first
    sinks[l] and last recent[l] chunks and the best-scored others, keep[l] in all.
    Returns chunk ids (L, K), K = max(keep), and which of them count (L, K): row l's first keep[l].
    """
    scores = chunk_scores(q, abstracts, counts)  # (L, C)
    col = torch.arange(scores.shape[-1])
    forced = (col < sinks[:, None]) | ((col >= (counts - recent)[:, None]) & (col < counts[:, None]))
    scores = scores.masked_fill(forced, float("inf"))
    k = int(keep.max())
    return scores.topk(k, -1).indices, torch.arange(k) < keep[:, None]
