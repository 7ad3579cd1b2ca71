"""Chunk selection by token scores (kernels/token_scores.py) and its native twin
(mixed_attention.select_tokens)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetok.kernels import mixed_attention
from edgetok.kernels.selection import captured_mass
from edgetok.kernels.token_scores import KeySketch, channels_for, forced_chunks, select_by_masses, token_masses
from edgetok.runtimes.kv import KVConfig, TieredCache


def test_with_every_channel_the_masses_are_the_exact_attention():
    """Scored on all D channels the estimate is the softmax itself: each chunk's mass is the sum of
    its tokens' attention, the window's the rest, per query head."""
    g = torch.Generator().manual_seed(0)
    hkv, group, d, n, size = 2, 3, 32, 200, 16
    q, keys = torch.randn(hkv * group, d, generator=g), torch.randn(hkv, n, d, generator=g)
    masses, window = token_masses(q, keys, n // size, size, channels=d)
    p = (q.reshape(hkv, group, d) @ keys.transpose(1, 2) / math.sqrt(d)).softmax(-1)  # (Hkv, G, N)
    cut = n // size * size
    torch.testing.assert_close(masses, p[..., :cut].reshape(hkv, group, -1, size).sum(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(window, p[..., cut:].sum(-1), atol=1e-6, rtol=1e-5)


def test_a_fixed_budget_reads_the_forced_chunks_then_the_most_wanted():
    masses = torch.tensor([[[0.05, 0.30, 0.02, 0.10, 0.01, 0.02], [0.01, 0.02, 0.40, 0.03, 0.01, 0.03]]])  # (1, 2, 6)
    forced = forced_chunks(6, sinks=1, recent=1, pinned=torch.zeros(6, dtype=torch.bool))
    picked = select_by_masses(masses, torch.full((1, 2), 0.5), forced, keep=4, coverage=None, per_head=True)
    # chunks 0 and 5 forced; then 2 (0.40 for the second query head) and 1 (0.30 for the first)
    assert picked.chosen[0].tolist() == [0, 1, 2, 5]
    assert picked.estimated == pytest.approx(min(0.5 + 0.05 + 0.30 + 0.02 + 0.02, 0.5 + 0.01 + 0.02 + 0.40 + 0.03))


def test_coverage_reads_the_fewest_chunks_that_hold_the_target_for_every_query_head():
    masses = torch.tensor([[[0.4, 0.3, 0.1, 0.05], [0.1, 0.1, 0.6, 0.05]]])  # (1, 2, 4): window 0.15 and 0.05
    window, none = torch.tensor([[0.15, 0.05]]), torch.zeros(4, dtype=torch.bool)
    # order by the group's most wanting head: 2 (0.6), 0 (0.4), 1 (0.3), 3
    picked = select_by_masses(masses, window, none, keep=4, coverage=0.8, per_head=False)
    assert picked.chosen[0].tolist() == [0, 1, 2]  # head 1: 0.05 + 0.6 + 0.1 + 0.1 = 0.85; head 0 then 0.95
    assert picked.estimated == pytest.approx(0.85)
    floor = select_by_masses(masses, window, none, keep=4, coverage=0.5, per_head=False, least=3)
    assert len(floor.chosen[0]) == 3  # one chunk would do; the floor reads three


def test_the_sketch_packs_any_run_of_tokens_and_reads_back_within_half_a_step():
    """Keys added in runs of odd lengths pack two tokens a byte across the runs' seams; read back, a
    key within the first run's range is within half a step of itself, one beyond it is clamped."""
    from edgetok.kernels.token_scores import sketch_codes

    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 53, 8, generator=g) + torch.linspace(-3, 5, 8)  # channels at offsets of their own
    keys[:, 40:] *= 3  # later keys beyond the range the first run fixed
    sketch = KeySketch()
    for lo, hi in ((0, 7), (7, 8), (8, 29), (29, 40), (40, 53)):
        sketch.add(keys[:, lo:hi])
    assert sketch.n == 53 and torch.equal(sketch.codes(), sketch_codes(keys, sketch.low, sketch.step))
    back = sketch.keys(keys[:, :0])
    inside = (keys[:, :7] - back[:, :7]).abs()
    assert (inside <= sketch.step[:, None] / 2 + 1e-5).all()
    low, high = sketch.low[:, None], sketch.low[:, None] + 15 * sketch.step[:, None]
    torch.testing.assert_close(back, torch.minimum(torch.maximum(back, low), high))  # clamped to the range
    assert sketch.packed.shape[2] * 2 >= 53 and sketch.nbytes < keys.numel()  # half a byte a key (and the range)


def test_the_cache_keeps_a_sketch_an_eighth_of_its_bf16_kv():
    g = torch.Generator().manual_seed(2)
    hq, hkv, d, n = 6, 2, 64, 2048
    cache = TieredCache(KVConfig(budget="25%", chunk_sizes=(16,)), 2, hq, hkv, d)
    for layer in range(2):
        cache.attend(layer, torch.randn(1, hq, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g),
                     torch.randn(1, hkv, n, d, generator=g))
    cache.end_prefill()
    kv_mb = 2 * 2 * hkv * n * d * 2 / 2**20  # layers × (K, V) × bf16
    assert cache.stats()["scoring"] == "tokens"
    assert kv_mb / 8 <= cache.stats()["sketch_mb"] <= kv_mb / 8 * 1.3  # (+ room to grow)
    assert all(s.n == layer.n_chunks * layer.chunk_size for s, layer in zip(cache.sketches, cache.layers))
    cache_b = TieredCache(KVConfig(budget="25%", scoring="bounds"), 1, hq, hkv, d)
    assert "sketch_mb" not in cache_b.stats()


@st.composite
def _problem(draw):
    hkv, g, d = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 3, 4])), draw(st.sampled_from([64, 128, 256]))
    size = draw(st.sampled_from([16, 32, 64]))
    n = draw(st.integers(1, 40 * size))
    capacity = n + draw(st.integers(0, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    slab = (torch.randn(hkv, capacity, d, generator=gen) * torch.rand(d, generator=gen) * 3).bfloat16()
    q = torch.randn(hkv * g, d, generator=gen) * draw(st.sampled_from([0.3, 1.0, 3.0]))
    count = n // size
    pinned = torch.rand(count + 3, generator=gen) < draw(st.sampled_from([0.0, 0.1]))
    sinks, recent = draw(st.integers(0, min(1, count))), draw(st.integers(0, min(3, count)))
    keep = draw(st.integers(1, max(count, 1)))
    coverage = draw(st.sampled_from([None, 0.5, 0.9, 0.99]))
    least = draw(st.integers(0, keep)) if coverage else 0
    return q, slab, n, count, size, pinned, keep, sinks, recent, least, coverage, draw(st.booleans())


@pytest.mark.skipif(not mixed_attention.available(), reason="the native kernel is not built")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=_problem(), isa=st.sampled_from(mixed_attention.isas() or ["scalar"]))
def test_native_token_selection_equals_the_reference(problem, isa):
    """select_tokens chooses token_masses + select_by_masses' chunks over the sketch's keys and the
    window's, with their estimate: head sizes 64 to 256, 64-token blocks and their remainders,
    shared or per head, fixed or covered, floors."""
    q, slab, n, count, size, pinned, keep, sinks, recent, least, coverage, per_head = problem
    sketch = KeySketch()
    if count:
        sketch.add(slab[:, : count * size // 2 + 1])  # (a scale the later keys may exceed: they clamp)
        sketch.add(slab[:, count * size // 2 + 1 : count * size])
    masses, window = token_masses(q, sketch.keys(slab[:, count * size : n]), count, size)
    want = select_by_masses(masses, window, forced_chunks(count, sinks, recent, pinned), keep, coverage, per_head, least)
    got, estimated = mixed_attention.select_tokens(q, slab, sketch, n, count, size, pinned, keep, sinks, recent, least,
                                                   coverage, per_head, channels_for(q.shape[-1]), isa)
    if count == 0:
        assert all(len(ids) == 0 for ids in got)
        return
    assert [ids.tolist() for ids in got] == [ids.tolist() for ids in want.chosen]
    assert estimated == pytest.approx(want.estimated, abs=2e-5)


@pytest.mark.skipif(not mixed_attention.available(), reason="the native kernel is not built")
@pytest.mark.parametrize("keep, coverage, least", [(150, None, 0), (600, 0.99, 0), (600, 0.9, 120)])
def test_native_token_selection_of_a_long_layer_equals_the_reference(keep, coverage, least):
    """600 chunks (the property test's layers have 40 at most): the ranking sorts past what it reads
    anyway in several rounds, as far as a coverage walk goes; still the reference's chunks."""
    g = torch.Generator().manual_seed(3)
    hkv, group, d, size, count = 3, 3, 64, 16, 600
    n = count * size + 21
    slab = (torch.randn(hkv, n + 5, d, generator=g) * torch.rand(d, generator=g) * 3).bfloat16()
    q = torch.randn(hkv * group, d, generator=g) * 0.5  # (spread attention: a long walk)
    pinned = torch.zeros(count, dtype=torch.bool)
    pinned[[17, 300]] = True
    sketch = KeySketch()
    sketch.add(slab[:, : count * size])
    masses, window = token_masses(q, sketch.keys(slab[:, count * size : n]), count, size)
    for per_head in (False, True):
        want = select_by_masses(masses, window, forced_chunks(count, 1, 2, pinned), keep, coverage, per_head, least)
        got, estimated = mixed_attention.select_tokens(q, slab, sketch, n, count, size, pinned, keep, 1, 2, least, coverage,
                                                       per_head, channels_for(d))
        assert [ids.tolist() for ids in got] == [ids.tolist() for ids in want.chosen]
        assert estimated == pytest.approx(want.estimated, abs=2e-5)
        assert max(len(ids) for ids in got) > 64  # (past the first rounds of sorting)


def _planted(seed: int, hq: int, d: int, channels: int, noise: float, lean: float, match: float):
    """Noisy keys and values (1, 1024, d), nine tokens in nine chunks matching the query's sign on its
    first `channels` channels (match · sign), and the query (hq, d): noise plus lean · sign there."""
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, 1024, d, generator=g), torch.randn(1, 1024, d, generator=g)
    sign = torch.randn(channels, generator=g).sign()
    q = noise * torch.randn(hq, d, generator=g)
    q[:, :channels] += lean * sign
    for t in range(40, 900, 96):  # nine tokens the query wants, in nine chunks
        keys[0, t, :channels] = match * sign
    step = [torch.randn(1, 1, 1, d, generator=g) for _ in range(2)]  # the decode step's own key and value
    return keys, values, q, step


def _captured_mass(cache: TieredCache, keys, values, q, step) -> torch.Tensor:
    """Prefill the one-layer cache with keys/values, decode one step with q: each query head's
    attention mass that the cache's selection for q reads."""
    hq, n, d = q.shape[0], keys.shape[1], keys.shape[2]
    prompt_queries = torch.randn(1, hq, n, d, generator=torch.Generator().manual_seed(5))  # (pins: not the planted tokens)
    cache.attend(0, prompt_queries, keys[None], values[None])
    cache.end_prefill()
    cache.attend(0, q[None, :, None], *step)
    chosen = cache._select(0, q)
    return captured_mass(q, cache.storage.gather(0, chosen[0])[0], cache.storage.layer_kv(cache.layers[0])[0].float())


def test_token_scores_find_the_tokens_that_loose_bounds_hide():
    """A query on 16 channels and noisy keys: every chunk's bound is the sum of its channels'
    extremes (different tokens' each), so a chunk holding one token that matches the query bounds
    no higher than the rest. The tokens' scores find the nine such tokens; at the same budget the
    token-scored cache captures far more of the attention than the bound-ranked one."""
    keys, values, q, step = _planted(4, hq=3, d=64, channels=16, noise=0.1, lean=2.0, match=1.5)  # (logit ≈ 6)
    mass = {}
    for scoring in ("tokens", "bounds"):
        cache = TieredCache(KVConfig(budget="320", chunk_sizes=(16,), recent_tokens=16, scoring=scoring), 1, 3, 1, 64)
        mass[scoring] = _captured_mass(cache, keys, values, q, step)
        assert cache.stats()["scoring"] == scoring
    assert mass["tokens"].min() > 0.6 and mass["tokens"].mean() > mass["bounds"].mean() + 0.2, mass


def test_token_scoring_is_checked():
    from edgetok.errors import EdgetokError

    with pytest.raises(EdgetokError, match="--kv-scoring"):
        KVConfig(budget="25%", scoring="exact")
    with pytest.raises(EdgetokError, match="in RAM"):
        KVConfig(budget="25%", scoring="tokens", bits="4")
    assert not KVConfig(budget="25%", bits="4").scores_tokens  # tiers: bounds
    assert KVConfig(budget="25%").scores_tokens and not KVConfig(budget="25%", scoring="bounds").scores_tokens


def test_cli_scoring(tiny_folder):
    from conftest import run_cli

    args = ["run", str(tiny_folder), "-p", "The quick brown fox " * 40, "--no-chat", "-n", "12", "--kv-budget", "25%", "--json"]
    for scoring in ("bounds", "tokens"):
        r = run_cli(*args, "--kv-scoring", scoring)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["stats"]["kv"]["scoring"] == scoring
    r = run_cli(*args, "--kv-scoring", "tokens", "--kv-bits", "4")
    assert r.exit_code == 1 and "--kv-scoring" in r.stderr and "Traceback" not in r.output


def test_a_wide_head_scores_on_more_channels():
    """A 256-channel head whose query leans on 96 channels a little each (Gemma 3's global layers are
    256 wide): nine tokens match it on all 96. Scored on 24 channels they hide among the noise; the
    cache scores a wide head on half its channels and captures far more of the attention."""
    keys, values, q, step = _planted(6, hq=4, d=256, channels=96, noise=0.05, lean=2.0, match=0.4)
    mass = {}
    for channels in (None, 24):
        cache = TieredCache(KVConfig(budget="320", chunk_sizes=(16,), recent_tokens=16), 1, 4, 1, 256)
        if channels is not None:
            cache.channels = channels  # what the cache read before heads were sized
        mass[channels] = _captured_mass(cache, keys, values, q, step).mean()
    assert channels_for(256) == 128 and channels_for(64) == 24
    assert mass[None] > mass[24] + 0.1, mass
