"""Prompt-token pruning: which prompt tokens the later layers keep.

After an early layer, the last prompt tokens (the observation window, which holds the question)
tell which earlier tokens matter: the attention each token receives from the window's queries.
The top tokens, the attention sinks (the first tokens) and the window itself go on through the
remaining layers; the rest stop there.

Attention after an early layer misses facts the question refers to by name (a passphrase planted
mid-prompt: BENCHMARKS.md, "Prompt pruning"), so the torch path also keeps what the window's words
point at: the tokens around the densest matches of the window's rare token ids in the prompt
(`referenced`), whatever layer L's attention says.

Pure functions of tensors, no model or cache: an ONNX graph rewrite mirrors the attention scoring
op for op (MatMul, Softmax with a causal mask, ReduceMean, ReduceMax, MaxPool, TopK); the keyword
matches depend on the token ids alone (kernels/keep.py, numpy): the ONNX path computes them before
its graph runs and hands them in (names.PRUNE_FORCED).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window_attention(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q (H, W, D): the queries of the last W of N positions; keys (Hkv, N, D), H a multiple of
    Hkv → attention probabilities (H, W, N), causal (a window query sees no later key)."""
    h, w, d = q.shape
    hkv, n, _ = keys.shape
    g = h // hkv
    # Query head j reads KV head j // g: group the query heads by KV head instead of repeating keys.
    scores = q.float().reshape(hkv, g * w, d) @ keys.float().transpose(1, 2) / math.sqrt(d)  # (Hkv, G·W, N)
    scores = scores.view(h, w, n)
    q_pos = torch.arange(n - w, n)[:, None]
    scores = scores.masked_fill(torch.arange(n)[None, :] > q_pos, float("-inf"))
    return scores.softmax(-1)


def received(p: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """p (H, W, N) → (N,): the attention each key receives, averaged over the window's queries,
    from the head that wants it most; with pool > 1 (odd), a token also takes its neighbours' best
    score, so a kept fact keeps the words around it."""
    scores = p.mean(1).amax(0)
    if pool > 1:
        scores = F.max_pool1d(scores[None, None], pool, stride=1, padding=pool // 2)[0, 0]
    return scores


def token_scores(q: torch.Tensor, keys: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """q (H, W, D), keys (Hkv, N, D) → (N,) importance of each of the N tokens."""
    return received(window_attention(q, keys), pool)


def select_kept(scores: torch.Tensor, count: int, sinks: int, window: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """scores (N,) → the indices (count,) of the kept tokens in order: the first `sinks`, the last
    `window`, the tokens `keep` (N,) marks (at most count - sinks - window of them), and the
    best-scored of the rest. count ≥ sinks + window (see kept_count). Ties (the max-pool makes
    neighbours equal) go to the earlier token, as ONNX's TopK breaks them."""
    n = scores.shape[0]
    forced = scores.clone()
    if keep is not None:
        forced[torch.as_tensor(keep)] = float("inf")
    forced[: min(sinks, n)] = float("inf")
    forced[max(n - window, 0) :] = float("inf")
    best = torch.sort(forced, descending=True, stable=True).indices[: min(count, n)]
    return best.sort().values
