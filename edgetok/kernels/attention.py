"""Attention of new queries over stored keys/values (GQA), causal among the new tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(t: int, s: int, window: int | None = None, device=None) -> torch.Tensor | None:
    """Boolean mask (t, s), True where query i (the i-th of the last t positions) may see key j.

    Keys are the positions 0..s-1 and the queries the last t of them. None when no masking
    is needed (a single query with no window), so SDPA can take its fastest path.
    """
    if t == 1 and (window is None or s <= window):
        return None
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Boolean mask (t, s), True where a query at q_pos (t,) may see a key at k_pos (s,): keys at or
    before it and, with a window, fewer than `window` positions back. For stored tokens whose
    positions have gaps (a pruned prompt): a sliding window counts positions, not stored tokens.
    None when every query sees every key."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return None if bool(mask.all()) else mask


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, S, D) with Hq a multiple of Hkv → (B, Hq, T, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's attention with its log-sum-exp, float32: q (Hq, T, D), k/v (Hkv, S, D), mask
    (T, S) or None → out (Hq, T, D) and the log-sum-exp of each query's scaled scores (Hq, T)
    (what the mixed-bit kernel returns, so a caller can merge more keys into the same softmax)."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    qg = q.float().reshape(hkv, hq // hkv, t, d)  # (Hkv, G, T, D)
    scores = qg @ k.float().transpose(1, 2)[:, None] / d**0.5  # (Hkv, G, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)  # (Hkv, G, T)
    out = (scores - lse[..., None]).exp() @ v.float()[:, None]  # (Hkv, G, T, D)
    return out.reshape(hq, t, d), lse.reshape(hq, t)
