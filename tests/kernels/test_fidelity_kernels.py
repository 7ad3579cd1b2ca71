"""Coverage selection (--kv-budget auto), the captured attention mass, and what pruning keeps
because the window's words refer to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetok.kernels import mixed_attention
from edgetok.kernels.keep import referenced
from edgetok.kernels.pruning import select_kept, window_attention
from edgetok.kernels.selection import (
    TEMPERATURES,
    captured_mass,
    chunk_shares,
    chunk_upper_bounds,
    coverage_achieved,
    coverage_keep,
    fit_temperature,
    key_abstracts,
    select_chunks,
    stored_abstracts,
)

G = torch.Generator().manual_seed(0)


def test_captured_mass_is_the_softmax_share_of_what_was_read():
    q, keys = torch.randn(6, 16, generator=G), torch.randn(2, 50, 16, generator=G)
    read = [3, 7, 8, 20, 49]
    got = captured_mass(q, keys[:, read], keys)
    scores = (q.view(2, 3, 16) @ keys.transpose(1, 2)) / 4.0  # (Hkv, G, N)
    want = scores.softmax(-1)[..., read].sum(-1).reshape(-1)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(captured_mass(q, keys, keys), torch.ones(6), atol=1e-5)


def test_coverage_keep_counts_along_the_order_for_the_worst_head():
    shares = torch.tensor([[[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]]])  # (1 layer, 2 heads, 4 chunks)
    order = torch.tensor([[0, 3, 1, 2]])
    keep, covered = coverage_keep(shares, order, 0.85)
    # head 0 along the order: 0.5, 0.6, 0.9 → 3; head 1: 0.1, 0.7, 0.8, 1.0 → 4
    assert keep.tolist() == [4]
    assert abs(covered.item() - 1.0) < 1e-6
    keep, covered = coverage_keep(shares, order, 0.55)  # head 0: 1 → 0.5 < .55 → 2; head 1: 2 (0.7)
    assert keep.tolist() == [2] and abs(covered.item() - 0.6) < 1e-6


def _layer(concentrated: bool, c: int = 40, s: int = 16, d: int = 32):
    """One layer's abstracts (1, Hkv, 2D, C) and a query (1, Hq, D) whose attention falls on a
    few chunks (concentrated) or on all of them."""
    keys = torch.randn(2, c, s, d, generator=G) * 0.3
    q = torch.randn(1, 4, d, generator=G)
    if concentrated:
        keys[:, [5, 17, 30]] += 2.0 * q[0, ::2, None, None, :]  # three chunks align with the query
    return q, key_abstracts(keys)[None]


def test_auto_selection_grows_where_attention_is_spread():
    kept = {}
    for concentrated in (True, False):
        q, abstracts = _layer(concentrated)
        c = torch.tensor([abstracts.shape[-1]])
        chosen, valid, estimated = select_chunks(q, abstracts, c, c, torch.tensor([1]), torch.tensor([1]), 0.9)
        kept[concentrated] = int(valid.sum())
        assert estimated.item() >= 0.9 - 1e-6
        assert {0, 39} <= set(chosen[0, : kept[concentrated]].tolist())  # sinks and recent stay
        if concentrated:
            assert {5, 17, 30} <= set(chosen[0, : kept[concentrated]].tolist())
    assert kept[True] < kept[False] / 2


def test_fixed_keep_is_unchanged_by_the_coverage_code():
    q, abstracts = _layer(True)
    c = torch.tensor([abstracts.shape[-1]])
    chosen, valid, estimated = select_chunks(q, abstracts, c, torch.tensor([10]), torch.tensor([1]), torch.tensor([2]))
    assert 0 < estimated.item() <= 1 + 1e-6 and int(valid.sum()) == 10
    scores = chunk_shares(q, abstracts).amax(-2)[0]
    scores[[0, 38, 39]] = float("inf")
    assert set(chosen[0].tolist()) == set(scores.topk(10).indices.tolist())


def test_the_fitted_temperature_is_the_smallest_that_meets_the_target():
    keys = torch.randn(2, 600, 32, generator=G)
    q = torch.randn(4, 32, 32, generator=G)
    keys[:, 100:116] += q[::2, 0, None, :] * 0.5  # a chunk the queries favour
    p = window_attention(q, keys)
    for coverage in (0.5, 0.9, 0.99):
        t = fit_temperature(q, keys, p, 16, coverage)
        achieved = {x: coverage_achieved(q, keys, p, 16, coverage, x) for x in TEMPERATURES}
        assert t == TEMPERATURES[-1] or achieved[t] >= coverage
        assert all(achieved[x] < coverage for x in TEMPERATURES if x < t)
    # flatter shares keep more chunks, so they capture more
    assert coverage_achieved(q, keys, p, 16, 0.9, 4.0) > coverage_achieved(q, keys, p, 16, 0.9, 0.5)


def test_referenced_keeps_the_neighbourhood_of_the_question_words():
    n, window = 2000, 20
    ids = torch.randint(0, 50, (n,), generator=G)  # common words (each 2 % of the prompt)
    fact = torch.tensor([901, 902, 903, 950, 951, 952])  # "secret passphrase vault amber falcon 7319"
    ids[1000:1006] = fact
    ids[n - window : n - window + 3] = fact[:3]  # the question names the first three
    ids[400] = 901  # one stray mention elsewhere
    keep = referenced(ids, window, radius=8, quota=100)
    assert keep[1000:1006].all()  # the fact, its answer too
    assert not keep[400] and not keep[n - window :].any()
    assert int(keep.sum()) <= 100
    kept = select_kept(torch.rand(n, generator=G), 300, 4, window, keep)
    assert set(range(1000, 1006)) <= set(kept.tolist())
    assert len(kept) == 300


def test_referenced_finds_nothing_without_shared_rare_words():
    ids = torch.arange(500) % 50  # every window word is frequent
    assert not referenced(ids, 32, 8, 64).any()


def test_per_head_selection_gives_each_head_its_own_chunks():
    """Two KV heads wanting disjoint chunks: shared, the budget splits between them; per head, each
    keeps its own best (and the forced sinks / recent chunks)."""
    c, s, d = 40, 16, 32
    keys = torch.randn(2, c, s, d, generator=G) * 0.1
    q = torch.randn(1, 4, d, generator=G)  # heads 0, 1 → KV head 0; heads 2, 3 → KV head 1
    wants = {0: [5, 6, 7, 8], 1: [20, 21, 22, 23]}
    for h, ids in wants.items():
        keys[h, ids] += 3.0 * q[0, 2 * h, None, :]
    abstracts = key_abstracts(keys)[None]
    n = torch.tensor([c])
    args = (abstracts, n, torch.tensor([6]), torch.tensor([1]), torch.tensor([1]))
    shared, _, _ = select_chunks(q, *args)
    per_head, valid, estimated = select_chunks(q, *args, per_head=True)
    assert shared.shape == (1, 6) and per_head.shape == (1, 2, 6) and bool(valid.all())
    for h, ids in wants.items():
        assert set(per_head[0, h].tolist()) == {0, 39, *ids}
        assert not set(ids) <= set(shared[0].tolist()) or not set(wants[1 - h]) <= set(shared[0].tolist())
    # under a coverage target each head keeps as many as it needs, at least the forced ones
    chosen, valid, estimated = select_chunks(q, abstracts, n, n, torch.tensor([1]), torch.tensor([1]), 0.9, per_head=True)
    assert estimated.item() >= 0.9 - 1e-6 and valid.shape[:2] == (1, 2)
    for h, ids in wants.items():
        assert set(ids) <= set(chosen[0, h, : int(valid[0, h].sum())].tolist())


@st.composite
def _selection_problem(draw):
    """A batch of layers' chunk abstracts with plans as the tiered cache makes them (sinks + recent
    + pinned ≤ keep ≤ count, or a coverage target), head sizes and groups the models use."""
    hkv, g, d = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 3, 8])), draw(st.sampled_from([16, 64, 128]))
    layers = draw(st.integers(1, 4))
    counts = [draw(st.integers(1, 150)) for _ in range(layers)]
    stride = max(counts) + draw(st.integers(0, 20))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, hkv, stride, 4, d, generator=gen)
    abstracts = torch.stack([stored_abstracts(k) for k in keys]).contiguous()  # (L, Hkv, 2D, stride)
    q = torch.randn(layers, hkv * g, d, generator=gen) * draw(st.sampled_from([0.3, 1.0, 3.0]))
    pinned = (torch.rand(layers, stride, generator=gen) < draw(st.sampled_from([0.0, 0.05]))) & (
        torch.arange(stride) < torch.tensor(counts)[:, None])
    plans = []
    for c, pins in zip(counts, pinned):
        sinks, recent = draw(st.integers(0, min(2, c))), draw(st.integers(0, min(3, c)))
        forced = int(((torch.arange(c) < sinks) | (torch.arange(c) >= c - recent) | pins[:c]).sum())
        plans.append((c, draw(st.integers(max(1, forced), c)), sinks, recent))
    coverage = draw(st.sampled_from([None, 0.5, 0.9, 0.99]))
    temperatures = torch.tensor([draw(st.sampled_from(TEMPERATURES)) for _ in range(layers)])
    return q, abstracts, pinned, torch.tensor(plans), temperatures, coverage, draw(st.booleans())


@pytest.mark.skipif(not mixed_attention.available(), reason="the native kernel is not built")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=_selection_problem(), isa=st.sampled_from(mixed_attention.isas() or ["scalar"]))
def test_native_selection_equals_the_reference(problem, isa):
    """mixed_attention.select (one native pass per layer) chooses select_chunks' chunks, with its
    coverage estimate: shared or per head, fixed keep or a coverage target, pinned chunks, odd counts."""
    q, abstracts, pinned, plans, temperatures, coverage, per_head = problem
    counts, keep, sinks, recent = plans.T
    want, valid, estimated = select_chunks(q, abstracts[..., : int(counts.max())], counts, keep, sinks, recent, coverage,
                                           temperatures, pinned, per_head=per_head)
    ids, n, got_estimated = mixed_attention.select(q, abstracts, pinned, plans, temperatures, coverage, per_head, isa)
    if not per_head:
        want, valid = want[:, None], valid[:, None]
    for layer in range(len(plans)):
        for group in range(want.shape[1]):
            assert ids[layer, group, : n[layer, group]].tolist() == sorted(want[layer, group][valid[layer, group]].tolist())
    np.testing.assert_allclose(got_estimated, estimated.numpy(), atol=2e-5)


@pytest.mark.skipif(not mixed_attention.available(), reason="the native kernel is not built")
def test_native_selection_skips_layers_that_read_everything():
    abstracts = torch.randn(2, 1, 32, 10).bfloat16()
    plans = torch.tensor([[10, -1, 0, 0], [0, 3, 0, 0]])  # every chunk read; no chunk yet
    ids, n, estimated = mixed_attention.select(torch.randn(2, 3, 16), abstracts, None, plans, torch.ones(2), None, False)
    assert n.tolist() == [[0], [0]] and estimated.tolist() == [1.0, 1.0]


def test_stored_abstracts_round_outward_so_bounds_stay_bounds():
    """bf16 abstracts (half the bytes): the maxima rounded up and the minima down, by at most one
    bf16 step, so q·k ≤ the bound still holds for every key of the chunk."""
    k = torch.randn(3, 20, 16, 64, generator=G) * 3
    exact, stored = key_abstracts(k), stored_abstracts(k).float()
    hi, lo = slice(0, 64), slice(64, 128)
    assert (stored[:, hi] >= exact[:, hi]).all() and (stored[:, lo] <= exact[:, lo]).all()
    assert ((stored - exact).abs() <= exact.abs() * 2**-7).all()  # within one bf16 step
    q = torch.randn(9, 64, generator=G)
    bounds = chunk_upper_bounds(q, stored_abstracts(k))  # (Hkv, C)
    scores = (q.view(3, 3, 1, 1, 64) * k[:, None]).sum(-1).amax(-1).amax(1) / 8.0  # (Hkv, C) the best key's
    assert (bounds >= scores - 1e-5).all()
