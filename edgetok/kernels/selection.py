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


def stored_abstracts(k: torch.Tensor) -> torch.Tensor:
    """key_abstracts as a cache keeps them: bfloat16, the maxima rounded up and the minima down, so
    the bounds stay upper bounds. Half the bytes of float32: after the K/V itself they are a decode
    step's largest read (every chunk's, every step)."""
    a = key_abstracts(k.float())
    d = a.shape[-2] // 2
    bits = a.view(torch.int32)
    cut = (bits & 0xFFFF) != 0  # not exact in bf16: its top 16 bits round toward zero
    away = torch.cat([a[..., :d, :] > 0, a[..., d:, :] < 0], -2) & cut  # max up (+), min down (−): away from zero
    return ((bits >> 16) + away.int()).to(torch.int16).view(torch.bfloat16)


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


def chunk_shares(q: torch.Tensor, abstracts: torch.Tensor, counts: torch.Tensor | None = None,
                 temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """(..., Hkv, C) per KV head, the share of its attention each chunk may take: a softmax over
    the chunks of the bounds divided by `temperature` ((...,) per layer, or one number; fitted so
    that the shares track measured attention, see fit_temperature). counts (...,): with a batch of
    layers, how many leading columns are each layer's chunks (the rest get 0)."""
    bounds = chunk_upper_bounds(q, abstracts)  # (..., Hkv, C)
    if counts is not None:
        padding = torch.arange(bounds.shape[-1]) >= counts[..., None]  # (..., C)
        bounds = bounds.masked_fill(padding[..., None, :], float("-inf"))
    t = torch.as_tensor(temperature, dtype=bounds.dtype)
    return (bounds / t.reshape(t.shape + (1, 1))).softmax(-1)


def chunk_scores(q: torch.Tensor, abstracts: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """(..., C) the attention mass each chunk may hold, at most, for the head that wants it most.

    Per KV head, a softmax over chunks of the bounds estimates the share of that head's attention a
    chunk can take (a layer's chunks share one length); the score is the max over heads, so a
    chunk one head needs is kept even if the others ignore it. counts (...,): with a batch of
    layers, how many leading columns are each layer's chunks (the rest score -inf).
    """
    scores = chunk_shares(q, abstracts, counts).amax(-2)
    if counts is None:
        return scores
    return scores.masked_fill(torch.arange(scores.shape[-1]) >= counts[..., None], float("-inf"))


def coverage_keep(shares: torch.Tensor, order: torch.Tensor, coverage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """How many chunks, taken in `order`, cover `coverage` of every head's estimated attention.

    shares (L, Hkv, C) per head (chunk_shares); order (L, C) the chunks best first. Returns the
    count (L,) (at least 1), and the share of the least covered head at that count (L,)."""
    covered = shares.gather(-1, order[:, None].expand_as(shares)).cumsum(-1)  # (L, Hkv, C)
    keep = heads_need(covered, coverage).amax(-1)  # (L,)
    at_keep = covered.gather(-1, (keep - 1)[:, None, None].expand(-1, shares.shape[1], 1))[..., 0]  # (L, Hkv)
    return keep, at_keep.amin(-1)


def heads_need(covered: torch.Tensor, coverage: float) -> torch.Tensor:
    """covered (L, Hkv, C): each head's estimated attention covered by the first 1, 2, … chunks of
    an order → (L, Hkv) how many it needs to reach `coverage` (at least 1, at most C)."""
    return (covered < coverage).sum(-1).clamp(max=covered.shape[-1] - 1) + 1


def select_chunks(
    q: torch.Tensor, abstracts: torch.Tensor, counts: torch.Tensor, keep: torch.Tensor,
    sinks: torch.Tensor, recent: torch.Tensor, coverage: float | None = None,
    temperature: torch.Tensor | float = 1.0, pinned: torch.Tensor | None = None, per_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each layer's chunks to attend to, for all layers at once.

    q (L, Hq, D); abstracts (L, Hkv, 2D, C) whose first counts[l] columns are layer l's chunks;
    keep, sinks, recent (L,) int64 with sinks + recent (+ pinned) ≤ keep ≤ counts. Layer l keeps
    its first sinks[l] and last recent[l] chunks, those `pinned` (L, C) bool marks, and the
    best-scored others, keep[l] in all — or, with a
    `coverage` target (--kv-budget auto), as many as its estimated shares (chunk_shares at
    `temperature`, (L,)) say cover that much of every head's attention, from sinks + recent up
    to keep[l].
    The ranking is the same at any temperature (a per-head constant scale of the bounds keeps each
    head's order; the max over heads can differ); the estimates use it.
    Returns chunk ids (L, K), which of them count (L, K) (row l's first keep[l]), and the
    estimated coverage of each layer's selection (L,): the least covered head's share.

    per_head: each KV head ranks the chunks by its own shares and keeps its own best, keep[l] each
    or, under a coverage target, as many as the neediest head needs along its own order (every
    head the same count: heads left at their own estimated needs read too little, BENCHMARKS.md):
    ids and which count are (L, Hkv, K). (Shared, a chunk one head needs displaces one another
    head needs: on legal text and JSON / CSV the least covered head held 3–4 % of its attention.)
    """
    shares = chunk_shares(q, abstracts, counts, temperature)  # (L, Hkv, C)
    col = torch.arange(shares.shape[-1])
    scores = shares if per_head else shares.amax(-2, keepdim=True)  # (L, G, C): G = Hkv or 1 (shared)
    scores = scores.masked_fill((col >= counts[:, None])[:, None], float("-inf"))
    forced = (col < sinks[:, None]) | ((col >= (counts - recent)[:, None]) & (col < counts[:, None]))  # (L, C)
    if pinned is not None:
        forced |= pinned[:, : shares.shape[-1]]
    scores = scores.masked_fill(forced[:, None], float("inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)  # (L, G, C)
    covered = shares.gather(-1, order.expand_as(shares)).cumsum(-1)  # (L, Hkv, C) along each head's order
    keep = keep[:, None].expand(-1, scores.shape[1])  # (L, G)
    if coverage is not None and shares.shape[-1]:  # (no chunk yet: nothing to cover)
        need = heads_need(covered, coverage).amax(-1, keepdim=True)  # (L, 1)
        keep = torch.minimum(torch.maximum(need, forced.sum(-1)[:, None]), keep)
    if shares.shape[-1] == 0:  # no layer has a chunk yet: nothing to miss
        estimated = torch.ones(shares.shape[0])
    else:
        at = (keep - 1).clamp(min=0)[..., None].expand(-1, shares.shape[1], 1)  # (L, Hkv, 1)
        estimated = covered.gather(-1, at)[..., 0].amin(-1)
    k = int(keep.max())
    chosen, valid = scores.topk(k, -1).indices, torch.arange(k) < keep[..., None]  # (L, G, K)
    return (chosen, valid, estimated) if per_head else (chosen[:, 0], valid[:, 0], estimated)


TEMPERATURES = (0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0)


def fit_temperature(q_obs: torch.Tensor, keys: torch.Tensor, p: torch.Tensor, chunk_size: int, coverage: float) -> float:
    """The temperature at which coverage selection, run with the observation queries on the
    prompt's chunks, captures `coverage` of their measured attention on average (the smallest
    such in TEMPERATURES; the largest if none does).

    q_obs (Hq, W, D) the last W prompt queries; keys (Hkv, N, D); p (Hq, W, N) their attention
    (kernels/pruning.window_attention). Only chunks wholly before the first observation query
    count, their attention renormalized over them."""
    for t in TEMPERATURES:
        if coverage_achieved(q_obs, keys, p, chunk_size, coverage, t) >= coverage:
            return t
    return TEMPERATURES[-1]


def coverage_achieved(q_obs: torch.Tensor, keys: torch.Tensor, p: torch.Tensor, chunk_size: int, coverage: float,
                      temperature: float) -> float:
    """The measured attention mass (mean over the observation queries and heads) that coverage
    selection at this temperature takes (see fit_temperature); 1.0 with fewer than 2 chunks."""
    hq, w, d = q_obs.shape
    hkv = keys.shape[0]
    c = (keys.shape[1] - w) // chunk_size
    if c < 2:
        return 1.0
    chunks = keys[:, : c * chunk_size].float().reshape(hkv, c, chunk_size, d)
    abstracts = key_abstracts(chunks).expand(w, -1, -1, -1)  # (W, Hkv, 2D, C)
    q = q_obs.float().transpose(0, 1)  # (W, Hq, D)
    actual = p[:, :, : c * chunk_size].reshape(hq, w, c, chunk_size).sum(-1)  # (Hq, W, C)
    actual = (actual / actual.sum(-1, keepdim=True).clamp(min=1e-30)).transpose(0, 1)  # (W, Hq, C)
    shares = chunk_shares(q, abstracts, None, temperature)  # (W, Hkv, C)
    order = shares.amax(-2).argsort(dim=-1, descending=True, stable=True)  # (W, C)
    keep, _ = coverage_keep(shares, order, coverage)  # (W,)
    taken = torch.arange(c)[None] < keep[:, None]  # (W, C) in order
    chosen = torch.zeros(w, c, dtype=torch.bool).scatter(1, order, taken)  # (W, C) by chunk id
    return (actual * chosen[:, None]).sum(-1).mean().item()


def captured_mass(q: torch.Tensor, attended: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The share of exact attention a selection held: q (Hq, D); attended (Hkv, S, D) the keys
    attention read, keys (Hkv, N, D) every key of the layer (a superset) → (Hq,) in [0, 1]."""
    hkv, _, d = keys.shape
    qg = q.reshape(hkv, -1, d).float() / math.sqrt(d)  # (Hkv, G, D)
    lse_read = (qg @ attended.float().transpose(1, 2)).logsumexp(-1)  # (Hkv, G)
    lse_all = (qg @ keys.float().transpose(1, 2)).logsumexp(-1)
    return (lse_read - lse_all).exp().reshape(-1)
