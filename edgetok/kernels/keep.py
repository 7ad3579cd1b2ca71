"""Which prompt tokens pruning keeps whatever the attention says, from the token ids alone: numpy,
so the ONNX path computes them before its graph runs (and without torch), and the torch path uses
the same function (kernels/pruning.py scores the rest by attention)."""

from __future__ import annotations

import math

import numpy as np

RARE = 0.01  # a window token counts as a keyword if at most this share of the prompt's tokens are it


def kept_count(n: int, keep: float, sinks: int, window: int) -> int:
    """How many of n tokens a `keep` fraction keeps: never fewer than the sinks and the window."""
    return min(n, max(math.ceil(keep * n), sinks + window))


def _window_sums(x: np.ndarray, radius: int) -> np.ndarray:
    """x (M,) → (M,): the sum of x over each element's ±radius neighbours (zeros past the ends)."""
    padded = np.concatenate([np.zeros(radius + 1), x.astype(np.float64), np.zeros(radius)])
    sums = np.cumsum(padded)  # (adding zeros changes no sum: a neighbourhood of zeros sums to exactly 0)
    return sums[2 * radius + 1 :] - sums[: -(2 * radius + 1)]


def referenced(ids, window: int, radius: int, quota: int) -> np.ndarray:
    """ids (N,) the prompt's token ids → (N,) bool: the tokens within ±radius of where the
    observation window's (the last `window` ids') rare tokens occur densest before it.

    Each window token id that occurs earlier, but in at most RARE of the prompt, is a keyword
    weighted by its inverse frequency (log N / count); a token's density is the weight of keyword
    occurrences within ±radius of it. The densest places, those at least half as dense as the
    densest, are marked with their ±radius neighbourhoods — at most `quota` tokens (the densest
    first; ties to the earlier token)."""
    ids = np.asarray(ids, dtype=np.int64)
    n = ids.shape[0]
    body = ids[: max(n - window, 0)]
    none = np.zeros(n, dtype=bool)
    if body.size == 0 or window == 0 or quota <= 0:
        return none
    counts = np.bincount(body, minlength=int(ids.max()) + 1).astype(np.float64)  # (V,)
    weight = np.zeros_like(counts)
    wanted = np.unique(ids[n - window :])
    c = counts[wanted]
    rare = (c > 0) & (c <= max(1.0, RARE * body.size))
    weight[wanted[rare]] = np.log(body.size / c[rare])
    density = _window_sums(weight[body], radius)  # (N − window,)
    if not (density > 0).any():
        return none
    centres = density >= 0.5 * density.max()
    densest_first = np.argsort(-density, kind="stable")
    if int(centres.sum()) > quota:  # too many: the densest quota of them
        centres = np.zeros_like(centres)
        centres[densest_first[:quota]] = True
    spans = _window_sums(centres, radius) > 0
    if int(spans.sum()) > quota:
        order = densest_first[spans[densest_first]]
        spans = np.zeros_like(spans)
        spans[order[:quota]] = True
    none[: body.size] = spans
    return none
