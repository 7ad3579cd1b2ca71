"""Chunk scoring from key abstracts: an upper bound of q·k over a chunk, without reading it.

For a chunk with element-wise key minimum m and maximum M (per KV head), and a query q,

    max_k q·k ≤ Σ_d max(q_d·m_d, q_d·M_d) = Σ_d (q_d⁺·M_d + q_d⁻·m_d),

so one matmul of [q⁺, q⁻] against the stacked abstracts [M; m] bounds every chunk at once.
"""

from __future__ import annotations

import math

import torch


def key_abstracts(k: torch.Tensor) -> torch.Tensor:
    """k (Hkv, C, S, D): C chunks of S tokens → abstracts (Hkv, 2D, C): max then min over each chunk."""
    return torch.cat([k.amax(2), k.amin(2)], -1).transpose(1, 2).contiguous()


def chunk_upper_bounds(q: torch.Tensor, abstracts: torch.Tensor) -> torch.Tensor:
    """q (Hq, D); abstracts (Hkv, 2D, C) → (Hkv, C) bounds of q·k / sqrt(D), max over the query
    heads that share each KV head."""
    hkv, two_d, _ = abstracts.shape
    d = two_d // 2
    qg = q.view(hkv, -1, d).float()  # (Hkv, G, D)
    qq = torch.cat([qg.clamp(min=0), qg.clamp(max=0)], -1)  # (Hkv, G, 2D)
    return torch.bmm(qq, abstracts.float()).amax(1) / math.sqrt(d)


def chunk_upper_bounds_reference(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """The definition, term by term: q (Hq, D), kmin/kmax (C, Hkv, D) → (Hkv, C)."""
    c, hkv, d = kmin.shape
    qg = q.view(hkv, -1, d)[None]  # (1, Hkv, G, D)
    terms = torch.maximum(qg * kmin[:, :, None], qg * kmax[:, :, None])  # (C, Hkv, G, D)
    return (terms.sum(-1).amax(-1) / math.sqrt(d)).T


def chunk_scores(q: torch.Tensor, abstracts: torch.Tensor) -> torch.Tensor:
    """(C,) the attention mass each chunk may hold, at most, for the head that wants it most.

    Per KV head, a softmax over chunks of the bounds estimates the share of that head's attention a
    chunk can take (a layer's chunks share one length); the score is the max over heads, so a
    chunk one head needs is kept even if the others ignore it.
    """
    return chunk_upper_bounds(q, abstracts).softmax(-1).amax(0)
