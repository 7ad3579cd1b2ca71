"""Every KV cache against the protocols of runtimes/kv/base.py, with the same cases: the attending
protocol (attend, truncate, state) as the torch model drives it, and the graph protocol
(view/append/advance) as the onnxruntime backend drives it. Small random tensors, no model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import kv_rows

from edgetok.runtimes.kv import AttendingCache, ContiguousCache, GraphCache, KVCache, KVConfig, TieredCache
from edgetok.runtimes.kv.arrays import to_torch

L, HQ, HKV, D = 2, 4, 2, 16
PROMPT, PIECE, STEPS = 96, 40, 40  # prompt tokens, prefill piece, decode steps
BUDGET = dict(budget="40%", sink_tokens=4, recent_tokens=8)
# device ≈ 1 float chunk of 16 tokens, host ≈ 2: most chunks live on disk
TIERS = dict(device_mb=0.004, host_mb=0.008)


@dataclass
class Case:
    kv: dict | None  # KVConfig fields, or None: the contiguous cache
    exact: bool  # attends over every token (a full budget)
    lossless: bool = True  # hands out the K/V it was given (in its kv_dtype), not decompressed ones

    @property
    def tiers(self) -> bool:
        return self.kv is not None and "device_mb" in self.kv

    def new(self, tmp_path) -> KVCache:
        if self.kv is None:
            return ContiguousCache(L, HKV, D)
        disk = dict(disk_dir=tmp_path) if self.tiers else {}
        return TieredCache(KVConfig(chunk_sizes=(8, 16), **self.kv, **disk), L, HQ, HKV, D)


CASES = {
    "contiguous": Case(None, exact=True),
    "tiered-ram": Case(dict(budget="100%"), exact=True),
    "tiered-ram-budget": Case(BUDGET, exact=False),
    "tiered-ram-auto": Case(dict(budget="auto", coverage=0.6, sink_tokens=4, recent_tokens=8), exact=False),
    "tiered-tiers": Case(dict(budget="100%", **TIERS), exact=True),
    "tiered-tiers-budget": Case(dict(BUDGET, bits="8", **TIERS), exact=False, lossless=False),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from a second thread, which only waits on the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]


@pytest.fixture
def new_cache(case, tmp_path):
    """Fresh caches of the case; the tiered ones are closed after the test (their disk files)."""
    made = []

    def new() -> KVCache:
        made.append(case.new(tmp_path))
        return made[-1]

    yield new
    for cache in made:
        if isinstance(cache, TieredCache):
            cache.close()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def seq():
    """Every layer's q (Hq, N, D) and k, v (Hkv, N, D) of a sequence, per layer: (L, H, N, D)."""
    g = torch.Generator().manual_seed(0)
    n = PROMPT + 2 * STEPS
    return tuple(torch.randn(L, h, n, D, generator=g) for h in (HQ, HKV, HKV))


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The definition: q (1, Hq, T, D), the last T of the S positions of k, v (1, Hkv, S, D), causal."""
    t, s = q.shape[2], k.shape[2]
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.arange(s)[None, :] > torch.arange(s - t, s)[:, None]
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def tolerance(cache: KVCache) -> float:
    return 1e-5 if cache.kv_dtype == np.float32 else 5e-2  # bf16 K/V


# -- drivers -------------------------------------------------------------------------------------
def attend(cache: AttendingCache, seq, a: int, b: int) -> list[torch.Tensor]:
    """Tokens [a, b) through every layer, as a model that attends itself → per layer (1, Hq, T, D)."""
    q, k, v = seq
    return [cache.attend(i, q[i, None, :, a:b], k[i, None, :, a:b], v[i, None, :, a:b]) for i in range(L)]


def prefill(cache, seq, n: int = PROMPT, start: int = 0, drive=attend) -> list[list[torch.Tensor]]:
    return [drive(cache, seq, a, min(a + PIECE, n)) for a in range(start, n, PIECE)]


def decode(cache, seq, start: int, steps: int = STEPS, drive=attend) -> list[list[torch.Tensor]]:
    return [drive(cache, seq, t, t + 1) for t in range(start, start + steps)]


def graph(cache: GraphCache, seq, a: int, b: int, in_place: bool = True) -> list[tuple]:
    """Tokens [a, b) as the onnxruntime backend hands them over, numpy arrays: each layer's view,
    then the new K/V written into the view's room (and advance) when there is room and in_place,
    else append. → per layer, a copy of the view's P slots: (k, v) (Hkv, P, D) tensors."""
    q, k, v = (x.numpy() for x in seq)
    t, seen = b - a, []
    for i in range(L):
        view_k, view_v, p = cache.view(i, reserve=t)
        assert isinstance(view_k, np.ndarray) and isinstance(view_v, np.ndarray)
        assert view_k.shape[2] == view_v.shape[2] >= p
        seen.append((to_torch(view_k[0, :, :p].copy()), to_torch(view_v[0, :, :p].copy())))
        r = min(t, cache.queries_read)
        queries = q[i, None, :, b - r : b] if r else None  # the last queries_read tokens' only
        if in_place and view_k.shape[2] > p:  # the cache's own buffers, with room for the new tokens
            assert view_k.shape[2] >= p + t
            view_k[0, :, p : p + t], view_v[0, :, p : p + t] = k[i, :, a:b], v[i, :, a:b]
            cache.advance(i, queries, t)
        else:
            cache.append(i, queries, k[i, None, :, a:b], v[i, None, :, a:b])
    return seen


def stored(seq, i: int, n: int, dtype: np.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's first n tokens' K/V as a cache of `dtype` holds them (Hkv, n, D)."""
    return tuple(to_torch(x[i, :, :n].numpy().astype(dtype)) for x in seq[1:])


def states(state) -> tuple[list, list]:
    """A KVState's numpy arrays as tensors: (layers, q_obs)."""
    assert all(isinstance(x, np.ndarray) for kv in state.layers for x in kv)
    return [tuple(map(to_torch, kv)) for kv in state.layers], [to_torch(q) for q in state.q_obs or []]


# -- KVCache -------------------------------------------------------------------------------------
def test_every_cache_implements_both_protocols(new_cache):
    cache = new_cache()
    assert isinstance(cache, AttendingCache) and isinstance(cache, GraphCache)
    assert cache.length == 0 and cache.queries_read >= 0


# -- AttendingCache ------------------------------------------------------------------------------
def test_attend_is_full_attention_at_a_full_budget(case, new_cache, seq):
    """Prefill is exact in every cache; decode too at a full budget (a budgeted one reads a subset)."""
    cache = new_cache()
    q, k, v = seq
    outs = prefill(cache, seq)
    cache.end_prefill()
    outs += decode(cache, seq, PROMPT)
    assert cache.length == PROMPT + STEPS
    if case.tiers:
        assert cache.stats()["bytes_read_per_token"]["disk"] > 0
    ends = [min(a + PIECE, PROMPT) for a in range(0, PROMPT, PIECE)] + list(range(PROMPT + 1, PROMPT + STEPS + 1))
    for n, (end, out) in enumerate(zip(ends, outs, strict=True)):
        if n >= len(ends) - STEPS and not case.exact:
            assert all(torch.isfinite(o).all() for o in out)
            continue
        for i, o in enumerate(out):
            want = full_attention(q[i, None, :, end - o.shape[2] : end], k[i, None, :, :end], v[i, None, :, :end])
            assert o.shape == want.shape and (o - want).abs().max() < tolerance(cache), (n, i)


def test_attend_reads_the_new_tokens(new_cache, seq):
    """Budgeted or not, attention reads the new tokens (causal among them): a query that matches
    its own token's key by far gets that token's value."""
    cache = new_cache()
    q, k, v = seq
    prefill(cache, seq)
    cache.end_prefill()
    decode(cache, seq, PROMPT, steps=STEPS - 1)
    t = PROMPT + STEPS - 1
    for i in range(L):
        key = 4 * k[i, None, :, t : t + 1]  # (1, Hkv, 1, D): longer than any stored key
        own = 8 * key.repeat_interleave(HQ // HKV, 1)  # (1, Hq, 1, D)
        out = cache.attend(i, own, key, v[i, None, :, t : t + 1])
        want = v[i, None, :, t : t + 1].repeat_interleave(HQ // HKV, 1)
        assert (out - want).abs().max() < tolerance(cache)


def test_truncate_keeps_a_prefix_or_starts_over(new_cache, seq):
    """truncate(n) keeps some m ≤ n tokens; continuing from m gives what a fresh cache fed the
    same tokens gives."""
    cache = new_cache()
    prefill(cache, seq)
    cache.end_prefill()
    decode(cache, seq, PROMPT, steps=5)
    assert cache.truncate(cache.length) == cache.length == PROMPT + 5  # nothing to forget
    kept = cache.truncate(PROMPT // 2)
    assert 0 <= kept <= PROMPT // 2 and cache.length == kept
    got = prefill(cache, seq, start=kept)[-1]
    cache.end_prefill()
    got += [o for step in decode(cache, seq, PROMPT, steps=10) for o in step]

    fresh = new_cache()
    if kept:
        attend(fresh, seq, 0, kept)
    want = prefill(fresh, seq, start=kept)[-1]
    fresh.end_prefill()
    want += [o for step in decode(fresh, seq, PROMPT, steps=10) for o in step]
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(got, want, strict=True))
    assert cache.truncate(0) == 0 and cache.length == 0


def test_state_round_trip_through_attend(case, new_cache, seq):
    """A prefilled cache's state, loaded into an empty cache: the same prompt, the same decode."""
    a = new_cache()
    prefill(a, seq)
    state = a.state
    layers, q_obs = states(state)
    assert len(state.layers) == L
    assert all(k.shape == v.shape == (HKV, PROMPT, D) and k.dtype == a.kv_dtype for k, v in state.layers)
    if a.queries_read:  # the last queries_read prompt queries, to measure attention with
        assert all(torch.equal(q_obs[i], seq[0][i, :, PROMPT - a.queries_read : PROMPT]) for i in range(L))
    b = new_cache()
    b.state = state
    assert b.length == PROMPT
    for (ka, va), (kb, vb) in zip(layers, states(b.state)[0], strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    for i in range(L):
        assert torch.equal(layers[i][0], stored(seq, i, PROMPT, a.kv_dtype)[0])
    for cache in (a, b):
        cache.end_prefill()
    for x, y in zip(decode(a, seq, PROMPT), decode(b, seq, PROMPT), strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True))


# -- GraphCache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("in_place", [True, False], ids=["advance", "append"])
def test_views_hold_the_stored_tokens(case, new_cache, seq, in_place):
    """Prefill: a view's P slots are the layer's stored tokens, in order. Decode: every stored token
    (in any order) at a full budget; a subset of them under a budget."""
    cache = new_cache()
    drive = lambda c, s, a, b: graph(c, s, a, b, in_place)  # noqa: E731
    starts = list(range(0, PROMPT, PIECE))
    for start, views in zip(starts, prefill(cache, seq, drive=drive), strict=True):
        for i, (k, v) in enumerate(views):
            want_k, want_v = stored(seq, i, start, cache.kv_dtype)
            assert torch.equal(k, want_k) and torch.equal(v, want_v)
    cache.end_prefill()
    for t, views in enumerate(decode(cache, seq, PROMPT, drive=drive), PROMPT):
        for i, (k, v) in enumerate(views):
            assert torch.isfinite(k).all() and torch.isfinite(v).all()
            everything = kv_rows(*stored(seq, i, t, cache.kv_dtype))
            if case.exact:
                assert kv_rows(k, v) == everything
            else:
                assert k.shape[1] < t
                if case.lossless:
                    held = set(everything)
                    assert all(row in held for row in kv_rows(k, v))
    assert cache.length == PROMPT + STEPS


def test_state_round_trip_through_views(new_cache, seq):
    """A state saved from a graph-prefilled cache: a fresh cache loaded with it hands out the same
    views, in prefill and in decode."""
    a = new_cache()
    prefill(a, seq, drive=graph)
    b = new_cache()
    b.state = a.state
    for cache in (a, b):
        cache.end_prefill()
    for x, y in zip(decode(a, seq, PROMPT, drive=graph), decode(b, seq, PROMPT, drive=graph), strict=True):
        assert all(torch.equal(ka, kb) and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(x, y, strict=True))


def test_both_protocols_store_the_same_prompt(new_cache, seq):
    """Prefilled through attend() or through views (the last queries_read queries only), a cache
    holds the same state: K/V and observation queries."""
    by_attend, by_graph = new_cache(), new_cache()
    prefill(by_attend, seq)
    prefill(by_graph, seq, drive=graph)
    x, y = by_attend.state, by_graph.state
    (x_layers, x_q), (y_layers, y_q) = states(x), states(y)
    assert all(torch.equal(ka, kb) and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(x_layers, y_layers, strict=True))
    assert (x.q_obs is None) == (y.q_obs is None)
    assert all(torch.equal(qa, qb) for qa, qb in zip(x_q, y_q, strict=True))
