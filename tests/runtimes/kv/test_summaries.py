"""Chunk summaries (--kv-summaries): each chunk's mean key and value, folded into a budgeted
decode step's softmax for the chunks it does not read."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_source

from edgetok.errors import EdgetokError
from edgetok.kernels.attention import attend_lse
from edgetok.kernels.summaries import chunk_summaries, fold
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.kv import KVConfig, TieredCache

HQ, HKV, D = 6, 2, 64


def prefilled(kv: KVConfig, keys: torch.Tensor, values: torch.Tensor, layers: int = 2) -> TieredCache:
    """A cache whose every layer holds the prompt keys, values (Hkv, N, D), measured by random queries."""
    cache = TieredCache(kv, layers, HQ, HKV, D, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    for i in range(layers):
        cache.attend(i, torch.randn(1, HQ, keys.shape[1], D, generator=g), keys[None], values[None])
    cache.end_prefill()
    return cache


def step(cache: TieredCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """One decode token through every layer: q (Hq, D), k, v (Hkv, D) → each layer's output (Hq, D)."""
    return [cache.attend(i, q[None, :, None], k[None, :, None], v[None, :, None])[0, :, 0] for i in range(len(cache.layers))]


def test_a_chunks_summary_is_its_exact_means():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(HKV, 300, D, generator=g), torch.randn(HKV, 300, D, generator=g)
    cache = prefilled(KVConfig(budget="25%", chunk_sizes=(16,), summaries="on"), keys, values)
    for _ in range(40):  # decode seals chunks of its own
        step(cache, *(torch.randn(h, D, generator=g) for h in (HQ, HKV, HKV)))
    for i, layer in enumerate(cache.layers):
        all_k, all_v = cache.storage.layer_kv(layer)
        size, c = layer.chunk_size, layer.n_chunks
        assert c * size > 300  # decoded tokens were sealed too
        want_k = all_k[:, : c * size].reshape(HKV, c, size, D).mean(2)
        want_v = all_v[:, : c * size].reshape(HKV, c, size, D).mean(2)
        assert torch.allclose(cache.summaries[i, :, :c, :D], want_k, atol=1e-6)
        assert torch.allclose(cache.summaries[i, :, :c, D:], want_v, atol=1e-6)


def test_nothing_unread_folds_nothing():
    """With every chunk read, folding leaves attention as it was; through the cache, a budget that
    covers every chunk gives the same outputs with summaries on and off."""
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(HQ, 3, D, generator=g), torch.randn(HKV, 50, D, generator=g), torch.randn(HKV, 50, D, generator=g)
    out, lse = attend_lse(q, k, v, None)
    summaries = chunk_summaries(k[:, :48].reshape(HKV, 3, 16, D), v[:, :48].reshape(HKV, 3, 16, D))
    assert torch.equal(fold(q, out, lse, summaries, torch.zeros(1, 3, dtype=torch.bool), 16), out)

    keys, values = torch.randn(HKV, 200, D, generator=g), torch.randn(HKV, 200, D, generator=g)
    on, off = (prefilled(KVConfig(budget="100%", summaries=s), keys, values) for s in ("on", "off"))
    for _ in range(5):
        x = [torch.randn(h, D, generator=g) for h in (HQ, HKV, HKV)]
        assert all(torch.equal(a, b) for a, b in zip(step(on, *x), step(off, *x)))


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_summaries_recover_spread_attention(noise):
    """Keys nearly alike (attention nearly uniform: what a top-k selection handles worst) and
    distinct values: at a 25 % budget, the output with summaries is much closer to full attention
    than without (exactly equal when the keys are identical)."""
    g = torch.Generator().manual_seed(3)
    n = 640
    keys = torch.randn(HKV, 1, D, generator=g).expand(HKV, n, D) + noise * torch.randn(HKV, n, D, generator=g)
    values = torch.randn(HKV, n, D, generator=g)
    kv = dict(budget="25%", chunk_sizes=(16,), recent_tokens=16)
    full, on, off = (prefilled(KVConfig(**a), keys, values) for a in
                     ({"budget": "100%"}, kv | {"summaries": "on"}, kv | {"summaries": "off"}))
    err_on, err_off = [], []
    for _ in range(8):
        q = torch.randn(HQ, D, generator=g)
        k = keys[:, 0] + noise * torch.randn(HKV, D, generator=g)
        v = torch.randn(HKV, D, generator=g)
        want = step(full, q, k, v)
        err_on += [(a - b).norm() / b.norm() for a, b in zip(step(on, q, k, v), want)]
        err_off += [(a - b).norm() / b.norm() for a, b in zip(step(off, q, k, v), want)]
    assert on.stats()["budget_used"] < 0.3 and on.stats()["summaries_read"] > 0.03
    assert max(err_off) > 0.3  # a quarter of the values: far from their mean
    assert max(err_on) < (1e-4 if noise == 0 else 0.1 * max(err_off))


def test_the_kv_store_keeps_summaries(tmp_path):
    """A prompt saved to the store and loaded into a fresh cache: the same summaries, the same decode."""
    from edgetok.runtimes.kv.store import PromptStore

    source = tiny_source(layers=3)

    backend = TorchBackend(source, kv=KVConfig(budget="25%", summaries="on"))
    prompt = torch.randint(0, 300, (600,), generator=torch.Generator().manual_seed(4)).tolist()
    store = PromptStore(tmp_path, "tiny", backend.new_cache().kv_dtype)

    def greedy(cache, logits, steps=12):
        backend.end_prefill(cache)
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits.argmax()))
            logits = backend.forward([tokens[-1]], cache)[-1]
        return tokens

    first = backend.new_cache()
    for i in range(0, len(prompt) - 1, 128):
        backend.forward(prompt[i : min(i + 128, len(prompt) - 1)], first)
    store.save(prompt[:-1], backend.save_prefix(first))
    want = greedy(first, backend.forward(prompt[-1:], first)[-1])

    second = backend.new_cache()
    backend.load_prefix(second, store.load(store.lookup(prompt), len(prompt) - 1))
    got = greedy(second, backend.forward(prompt[-1:], second)[-1])
    assert got == want
    assert first.stats()["summaries_read"] > 0
    n = first.layers[0].n_chunks
    assert n == second.layers[0].n_chunks and torch.equal(first.summaries[:, :, :n], second.summaries[:, :, :n])


def test_summaries_are_checked():
    with pytest.raises(EdgetokError, match="--kv-summaries"):
        KVConfig(budget="25%", summaries="maybe")
    with pytest.raises(EdgetokError, match="torch backend"):
        TieredCache(KVConfig(budget="25%", summaries="on"), 1, HQ, HKV, D, reads="views")
    assert not TieredCache(KVConfig(budget="25%"), 1, HQ, HKV, D, reads="views").summarize  # a graph's default: off


def test_per_head_selection_reads_each_heads_chunks_exactly():
    """Per-KV-head selection: each head's output is attention over its own chunks and the window
    (the kernel, one head at a time, against the reference); a head whose attention the others'
    choices crowd out captures more of it than under one shared selection."""
    g = torch.Generator().manual_seed(6)
    n = 640
    keys, values = 0.1 * torch.randn(HKV, n, D, generator=g), torch.randn(HKV, n, D, generator=g)
    q = torch.randn(HQ, D, generator=g)
    heads = HQ // HKV
    for h in range(HKV):  # each KV head's query group looks at its own 8 chunks (of 16 tokens)
        start = 64 + 256 * h
        keys[h, start : start + 128] += q[h * heads : (h + 1) * heads].mean(0)
    # 15 of the 40 chunks (the same count before and after the step's token joins the window)
    kv = dict(budget="248", chunk_sizes=(16,), recent_tokens=16, summaries="off")
    mass = {}
    for selection in ("layer", "head"):
        cache = prefilled(KVConfig(**kv, selection=selection), keys, values, layers=1)
        assert cache.per_head == (selection == "head")
        x = (q, torch.randn(HKV, D, generator=g), torch.randn(HKV, D, generator=g))
        out = step(cache, *x)[0]
        mass[selection] = cache.stats()["captured_mass_min_head"]
        chosen = cache._select(0, q)  # what the step chose (the same query, the same budget)
        if selection == "head":
            assert len(chosen) == HKV and all(len(ids) == len(chosen[0]) for ids in chosen)
            for h, ids in enumerate(chosen):
                k_h, v_h = cache.storage.gather(0, ids, head=h)
                want, _ = attend_lse(q[h * heads : (h + 1) * heads, None], k_h, v_h, None)
                assert (out[h * heads : (h + 1) * heads] - want[:, 0]).abs().max() < 1e-4
    assert mass["head"] > mass["layer"] + 0.1


def test_per_head_selection_is_checked():
    with pytest.raises(EdgetokError, match="--kv-selection"):
        KVConfig(budget="25%", selection="heads")
    with pytest.raises(EdgetokError, match="in RAM"):
        KVConfig(budget="25%", selection="head", bits="4")
    with pytest.raises(EdgetokError, match="torch backend"):
        TieredCache(KVConfig(budget="25%", selection="head"), 1, HQ, HKV, D, reads="views")


def test_cli_summaries_and_per_head_selection(tiny_folder):
    from conftest import run_cli

    args = ["run", str(tiny_folder), "-p", "The quick brown fox " * 40, "--no-chat", "-n", "20", "--kv-budget", "25%",
            "--backend", "torch"]
    r = run_cli(*args, "--kv-summaries", "on", "--kv-selection", "head", "--json")
    assert r.exit_code == 0, r.output
    kv = json.loads(r.stdout)["stats"]["kv"]
    assert kv["summaries"] == "on" and kv["selection"] == "head"  # (what they fold in: the store test above)
    r = run_cli(*args, "--kv-selection", "head", "--kv-bits", "4")
    assert r.exit_code == 1 and "--kv-selection" in r.stderr and "Traceback" not in r.output
