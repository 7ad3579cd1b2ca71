"""Chunk scoring from key abstracts: an upper bound of q·k over a chunk, without reading it."""

from __future__ import annotations

import math

import torch


def key_abstract(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k (Hkv, S, D) → element-wise (min, max) over the chunk's tokens, each (Hkv, D)."""
    return k.amin(1), k.amax(1)


def chunk_upper_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q (Hq, D); kmin, kmax (C, Hkv, D) → (C, Hkv) upper bounds of q·k / sqrt(D) over each chunk,
    the max over the query heads that share a KV head.

    Σ_d max(q_d·min_d, q_d·max_d) = Σ_d (q_d⁺·max_d + q_d⁻·min_d): two matmuls, no branch.
    """
    c, hkv, d = kmin.shape
    qg = q.view(hkv, -1, d)  # (Hkv, G, D)
    bound = torch.einsum("hgd,chd->chg", qg.clamp(min=0), kmax) + torch.einsum("hgd,chd->chg", qg.clamp(max=0), kmin)
    return bound.amax(-1) / math.sqrt(d)


def chunk_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(C,) the attention mass each chunk may hold, at most, for the head that wants it most.

    Per KV head, a softmax over chunks of (bound + log(chunk length)) estimates the share of that
    head's attention the chunk can take; the score is the max over heads, so a chunk one head
    needs is kept even if the others ignore it.
    """
    logits = chunk_upper_bounds(q, kmin, kmax) + lengths.float().log()[:, None]
    return logits.softmax(0).amax(-1)
