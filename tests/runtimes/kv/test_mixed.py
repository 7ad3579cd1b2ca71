"""The cache of a model with sliding-window and full-attention layers (Gemma 3): sliding layers keep
only their window and attend exactly over it; full layers are tiered; one cache to the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import kv_rows

from edgetok.runtimes.kv import KVConfig, MixedCache, TieredCache, budgeted_cache
from edgetok.runtimes.kv.window import ROLLBACK_SLACK

HQ, HKV, D = 4, 2, 16
WINDOW = 8
WINDOWS = [WINDOW, None, WINDOW]  # sliding, full, sliding
L = len(WINDOWS)
PROMPT, PIECE, STEPS = 96, 40, 3 * ROLLBACK_SLACK  # long enough that the sliding layers drop tokens


@pytest.fixture(scope="module")
def seq():
    g = torch.Generator().manual_seed(0)
    n = PROMPT + STEPS
    return tuple(torch.randn(L, h, n, D, generator=g) for h in (HQ, HKV, HKV))


def windowed_attention(q, k, v, window: int | None) -> torch.Tensor:
    """q (1, Hq, T, D), the last T of the S positions of k, v (1, Hkv, S, D): causal, within the window."""
    t, s = q.shape[2], k.shape[2]
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    qp, kp = torch.arange(s - t, s)[:, None], torch.arange(s)[None, :]
    hidden = (kp > qp) | ((kp <= qp - window) if window else torch.zeros_like(kp > qp))
    return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v


def new(tmp_path=None, **kv) -> MixedCache:
    cfg = KVConfig(chunk_sizes=(8, 16), **kv, **({"disk_dir": tmp_path} if tmp_path else {}))
    cache = budgeted_cache(cfg, WINDOWS, HQ, HKV, D)
    assert isinstance(cache, MixedCache)
    return cache


def run(cache, seq, a: int, b: int) -> list[torch.Tensor]:
    q, k, v = seq
    return [cache.attend(i, q[i, None, :, a:b], k[i, None, :, a:b], v[i, None, :, a:b]) for i in range(L)]


def spans() -> list[tuple[int, int]]:
    return [(a, min(a + PIECE, PROMPT)) for a in range(0, PROMPT, PIECE)] + [(t, t + 1) for t in range(PROMPT, PROMPT + STEPS)]


@pytest.mark.parametrize("tiers", [False, True], ids=["ram", "tiers"])
def test_full_budget_is_exact_and_sliding_layers_keep_only_their_window(seq, tmp_path, tiers):
    cache = new(tmp_path, budget="100%", device_mb=0.004, host_mb=0.008) if tiers else new(budget="100%")
    q, k, v = seq
    for a, b in spans():
        if a == PROMPT:
            cache.end_prefill()
        for i, out in enumerate(run(cache, seq, a, b)):
            want = windowed_attention(q[i, None, :, a:b], k[i, None, :, :b], v[i, None, :, :b], WINDOWS[i])
            assert (out - want).abs().max() < 1e-5, (a, i)
        for i in (0, 2):  # never more than twice what the window and a rollback need
            assert cache.sliding[i].n <= 2 * (WINDOW - 1 + ROLLBACK_SLACK)
    assert cache.length == PROMPT + STEPS
    stats = cache.stats()
    assert stats["sliding_layers"]["count"] == 2 and stats["sliding_layers"]["tokens_dropped"] > 0
    cache.close()
    assert list(tmp_path.iterdir()) == []


def test_budgeted_full_layers_and_exact_sliding_layers(seq):
    cache = new(budget="20%", sink_tokens=4, recent_tokens=8)
    q, k, v = seq
    for a, b in spans():
        if a == PROMPT:
            cache.end_prefill()
        outs = run(cache, seq, a, b)
        for i in (0, 2):  # the windows are always exact
            want = windowed_attention(q[i, None, :, a:b], k[i, None, :, :b], v[i, None, :, :b], WINDOW)
            assert (outs[i] - want).abs().max() < 5e-2  # bf16 K/V under a budget
    assert cache.stats()["budget_used"] < 0.5  # the full layer read a subset


def test_views_hold_the_window_in_order(seq):
    """Through the graph protocol a sliding layer's view is its last tokens in order (at least
    window − 1 of them), the new ones written in place after them."""
    cache = new(budget="100%")
    q, k, v = seq
    for a, b in spans():
        if a == PROMPT:
            cache.end_prefill()
        for i in range(L):
            vk, vv, p = cache.view(i, reserve=b - a)
            if WINDOWS[i] is None:
                assert kv_rows(vk[:, :, :p], vv[:, :, :p]) == kv_rows(k[i, :, :a], v[i, :, :a])
            else:
                assert p >= min(a, WINDOW - 1)
                assert np.array_equal(vk[0, :, :p], k[i, :, a - p : a]) and np.array_equal(vv[0, :, :p], v[i, :, a - p : a])
            vk[0, :, p : p + b - a], vv[0, :, p : p + b - a] = k[i, :, a:b], v[i, :, a:b]
            r = min(b - a, cache.queries_read)
            cache.advance(i, q[i, None, :, b - r : b].numpy(), b - a)
    assert cache.length == PROMPT + STEPS


def test_truncate_rolls_back_within_the_slack_else_starts_over(seq):
    cache = new(budget="100%")
    for a, b in spans()[:-1]:
        if a == PROMPT:
            cache.end_prefill()
        run(cache, seq, a, b)
    n = cache.length
    assert cache.truncate(n - 3) == n - 3  # a rejected draft
    out = run(cache, seq, n - 3, n - 2)
    q, k, v = seq
    want = windowed_attention(q[0, None, :, n - 3 : n - 2], k[0, None, :, : n - 2], v[0, None, :, : n - 2], WINDOW)
    assert (out[0] - want).abs().max() < 1e-5
    assert cache.truncate(10) == 0 and cache.length == 0  # the windows no longer hold position 10's past


def test_prompt_state_holds_the_windows_and_loads_back(seq):
    """A 200-token prompt (the sliding layers dropped tokens): its state, loaded into a fresh cache,
    attends to the prompt's next token exactly as the cache that made it; a prefix the windows no
    longer reach is refused."""
    q, k, v = seq
    n = 200
    first = new(budget="25%")
    for a in range(0, n, PIECE):
        run(first, seq, a, min(a + PIECE, n))
    state = first.state
    assert state.starts[1] == 0 and state.starts[0] == state.starts[2] > 0  # the windows dropped their oldest
    assert state.layers[1][0].shape[1] == n and state.layers[0][0].shape[1] == n - state.starts[0]
    assert state.windows == WINDOWS and state.q_obs[0] is None and state.q_obs[1] is not None
    assert state.prefix(20) is None
    second = new(budget="25%")
    second.state = state
    assert second.length == n
    want, got = run(first, seq, n, n + 1), run(second, seq, n, n + 1)
    for i in range(L):
        assert torch.equal(got[i], want[i]), i
        ref = windowed_attention(q[i, None, :, n : n + 1], k[i, None, :, : n + 1], v[i, None, :, : n + 1], WINDOWS[i])
        assert (got[i] - ref).abs().max() < 2e-2  # (bf16 K/V at a budget)
    first.close()
    second.close()


def test_one_kind_of_layer_is_one_tiered_cache():
    assert isinstance(budgeted_cache(KVConfig(), [None, None], HQ, HKV, D), TieredCache)
