"""Prompt pruning on tiny random models: exactness at KEEP 1.0, what each layer holds, positions,
the tiered cache, no reuse of a pruned cache, and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_hf_model, run_cli

from edgetok.errors import EdgetokError
from edgetok.kernels.keep import kept_count
from edgetok.kernels.pruning import select_kept, token_scores, window_attention
from edgetok.models.config import ModelConfig
from edgetok.models.sources import Source
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.engine import GenerationConfig
from edgetok.runtimes.kv import ContiguousCache, KVConfig
from edgetok.runtimes.prune import PrunePlan

N = 300
PROMPT = torch.randint(0, 300, (N,), generator=torch.Generator().manual_seed(11)).tolist()
CHUNK = 64  # several chunks in both phases


@pytest.fixture(scope="module")
def source():
    """A tiny random Llama with 4 layers (the tokenizer is not needed here)."""
    hf = make_hf_model("llama", vocab_size=300, seed=4, layers=4, max_positions=1024)
    weights = hf.state_dict()
    return Source("tiny4", None, "hf", ModelConfig.from_hf(hf.config.to_dict()), None, lambda: weights)


@pytest.fixture(scope="module")
def backend(source):
    return TorchBackend(source)


def plan(source, keep: float, after_layer: int) -> PrunePlan:
    return PrunePlan.checked(keep, after_layer, source.config)


def decode(backend, cache, logits, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy steps after a prefill → tokens, logits (steps, V) (the first row is the prefill's)."""
    backend.end_prefill(cache)
    tokens, rows = [], []
    for _ in range(steps):
        rows.append(logits)
        tokens.append(int(logits.argmax()))
        if len(tokens) < steps:
            logits = torch.from_numpy(backend.forward([tokens[-1]], cache)[-1])
    return tokens, torch.stack(rows)


def unpruned(backend, steps: int):
    cache = backend.new_cache()
    for i in range(0, N, CHUNK):
        logits = torch.from_numpy(backend.forward(PROMPT[i : i + CHUNK], cache)[-1])
    return decode(backend, cache, logits, steps) + (cache,)


def pruned(backend, p: PrunePlan, steps: int):
    cache = backend.new_cache()
    out = backend.prefill_pruned(PROMPT, cache, p, CHUNK)
    return decode(backend, cache, torch.from_numpy(out.logits), steps) + (cache, torch.from_numpy(out.kept))


# -- the kernel ----------------------------------------------------------------------------------
def test_window_attention_is_causal_gqa_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 5, 8, generator=g), torch.randn(2, 20, 8, generator=g)
    p = window_attention(q, k)
    assert p.shape == (4, 5, 20)
    full_k = k.repeat_interleave(2, 0)  # query head j reads KV head j // 2
    for i in range(5):  # window query i sits at position 15 + i: it sees keys 0..15+i
        want = (q[:, i : i + 1] @ full_k[:, : 16 + i].transpose(1, 2) / math.sqrt(8)).softmax(-1)[:, 0]
        assert torch.allclose(p[:, i, : 16 + i], want, atol=1e-6)
        assert (p[:, i, 16 + i :] == 0).all()


def test_selection_keeps_sinks_window_and_the_best():
    scores = torch.zeros(100)
    scores[[40, 41, 70]] = 1.0  # the tokens the window attends to
    count = kept_count(100, 0.2, sinks=4, window=10)
    kept = select_kept(scores, count, sinks=4, window=10).tolist()
    assert count == 20 and len(kept) == 20 and kept == sorted(kept)
    assert set(range(4)) | set(range(90, 100)) | {40, 41, 70} <= set(kept)
    # A tiny KEEP still keeps the sinks and the window; a short prompt is kept whole.
    assert kept_count(100, 0.01, 4, 10) == 14
    assert kept_count(10, 0.5, 4, 32) == 10
    assert select_kept(torch.rand(10), 10, 4, 32).tolist() == list(range(10))


def test_pooling_keeps_a_hit_neighbours():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 8, generator=g), torch.randn(1, 50, 8, generator=g)
    plain, pooled = token_scores(q, k), token_scores(q, k, pool=5)
    best = int(plain[4:46].argmax()) + 4
    assert (pooled[best - 2 : best + 3] >= plain[best]).all()


# -- the pruned prefill --------------------------------------------------------------------------
@pytest.mark.parametrize("after_layer", [0, 2])
def test_keep_all_is_exact(backend, source, after_layer):
    want, want_logits, _ = unpruned(backend, 12)
    got, logits, cache, kept = pruned(backend, plan(source, 1.0, after_layer), 12)
    assert kept.tolist() == list(range(N))
    assert got == want
    assert (logits - want_logits).abs().max() < 1e-5


def test_layers_hold_all_or_kept_tokens(backend, source):
    p = plan(source, 0.3, 1)
    _, _, full_cache = unpruned(backend, 1)
    _, _, cache, kept = pruned(backend, p, 1)
    assert len(kept) == math.ceil(0.3 * N)
    assert set(range(p.sinks)) | set(range(N - p.window, N)) <= set(kept.tolist())
    assert cache.lengths == [N, N, len(kept), len(kept)]
    assert cache.length == N
    for layer in (0, 1):  # the layers up to L hold every token's K/V, as without pruning
        assert np.array_equal(cache.k[layer][:, :, :N], full_cache.k[layer][:, :, :N])
    # Layer L+1's keys come from layer L's outputs: the full run's, at the kept positions (RoPE
    # at the original positions). Layer L+2's differ (layer L+1 attended to fewer tokens), except
    # at the sinks, which attend only to themselves.
    k2, k3 = cache.k[2][0, :, : len(kept)], cache.k[3][0, :, : len(kept)]
    assert np.allclose(k2, full_cache.k[2][0][:, kept.numpy()], atol=1e-5, rtol=1e-5)
    assert np.allclose(k3[:, : p.sinks], full_cache.k[3][0, :, : p.sinks], atol=1e-5, rtol=1e-5)
    assert not np.allclose(k3, full_cache.k[3][0][:, kept.numpy()], atol=1e-3, rtol=1e-5)


def test_pruned_prefill_and_decode_match_a_reference_by_hand(backend, source):
    """Layers ≤ L on the whole prompt in one piece, layers > L on the kept hidden states at their
    positions, then decode at positions N, N+1, ... given explicitly."""
    p = plan(source, 0.4, 1)
    got, logits, _, kept = pruned(backend, p, 8)
    model, c = backend.model, source.config
    ref = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim)
    with torch.inference_mode():
        x = model.embed(torch.tensor([PROMPT]))
        x = model.run_layers(x, model.rope(torch.arange(N), x.dtype), ref, 0, p.after_layer + 1)[:, kept]
        rows = [model.head(model.run_layers(x, model.rope(kept, x.dtype), ref, p.after_layer + 1)[0, -1])]
        for step, tok in enumerate(got[:-1]):
            rows.append(model(torch.tensor([[tok]]), ref, positions=torch.tensor([N + step]))[0, -1])
        wrong = model(torch.tensor([[got[0]]]), ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim),
                      positions=torch.tensor([len(kept)]))[0, -1]
    want = torch.stack(rows)
    assert (logits - want).abs().max() < 1e-4
    assert [int(r.argmax()) for r in want] == got
    assert (wrong - logits[1]).abs().max() > 1e-2  # the check can see a wrong position


def test_tiered_cache_with_a_pruned_prompt(source, tmp_path):
    """A full budget is exact over what the pruned prompt left, in RAM and in tiers over disk."""
    p = plan(source, 0.5, 1)
    want, want_logits, *_ = pruned(TorchBackend(source), p, 20)
    for kv in (KVConfig(budget="100%"), KVConfig(budget="100%", device_mb=0.02, host_mb=0.04, disk_dir=tmp_path)):
        got, logits, cache, _ = pruned(TorchBackend(source, kv=kv), p, 20)
        assert got == want
        assert (logits - want_logits).abs().max() < 1e-4
        assert cache.lengths[:2] == [N + 19] * 2 and cache.lengths[2:] == [150 + 19] * 2
        if kv.disk_dir is not None:
            assert cache.stats()["bytes_read_per_token"]["disk"] > 0
        cache.close()
    _, _, cache, _ = pruned(TorchBackend(source, kv=KVConfig(budget="25%")), p, 20)
    assert cache.stats()["budget_used"] < 0.9  # decode reads a subset of the kept tokens
    cache.close()


def test_progress_counts_every_prompt_token(backend, source):
    seen = []
    backend.prefill_pruned(PROMPT, backend.new_cache(), plan(source, 0.3, 1), CHUNK, seen.append)
    assert sum(seen) == N and all(s > 0 for s in seen)


# -- the engine, the API and the CLI -------------------------------------------------------------
def test_engine_never_reuses_a_pruned_cache(tiny, tmp_path):
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    options = dict(max_new_tokens=6, ignore_eos=True)
    tiny.engine.reset()
    fresh = tiny.generate(prompt + "And", **options)
    tiny.engine.reset()
    fresh_pruned = tiny.generate(prompt + "And", prune_prompt=0.5, prune_after_layer=0, **options)
    assert fresh_pruned.stats.prune == {"keep": 0.5, "after_layer": 0, "kept_tokens": fresh_pruned.stats.prune["kept_tokens"]}
    assert fresh_pruned.stats.prune["kept_tokens"] < fresh_pruned.prompt_tokens

    tiny.engine.reset()
    tiny.generate(prompt, **options)  # an unpruned prefix in the cache ...
    again = tiny.generate(prompt + "And", prune_prompt=0.5, prune_after_layer=0, **options)
    assert again.stats.reused_prompt_tokens == 0 and again.tokens == fresh_pruned.tokens  # ... is not reused
    after = tiny.generate(prompt + "And", **options)  # nor is the pruned one by an unpruned prompt
    assert after.stats.reused_prompt_tokens == 0 and after.tokens == fresh.tokens
    tiny.engine.reset()


def test_kv_store_is_not_used_for_pruned_prompts(tiny_folder, tmp_path):
    import edgetok

    m = edgetok.load(str(tiny_folder), backend="torch", kv_store=tmp_path / "store")
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    m.generate(prompt, max_new_tokens=2, prune_prompt=0.5, prune_after_layer=0)
    assert not list((tmp_path / "store").glob("*.kvstore"))
    m.generate(prompt, max_new_tokens=2)  # an unpruned prompt is stored ...
    m.engine.reset()
    r = m.generate(prompt + " And", max_new_tokens=2, prune_prompt=0.5, prune_after_layer=0)
    assert r.stats.store_tokens == 0 and r.stats.reused_prompt_tokens == 0  # ... and not read by a pruned one


def test_bad_values_give_one_clear_error(tiny, tiny_folder):
    for keep in (0, -0.5, 1.5):
        with pytest.raises(EdgetokError, match="--prune-prompt"):
            GenerationConfig(prune_prompt=keep)
    with pytest.raises(EdgetokError, match="needs --prune-prompt"):
        GenerationConfig(prune_after_layer=1)
    for layer in (-1, 1, 7):  # tiny has 2 layers: only layer 0 has a layer after it
        with pytest.raises(EdgetokError, match="between 0 and 0"):
            tiny.generate("hi", max_new_tokens=1, prune_prompt=0.5, prune_after_layer=layer)
    for args, words in ((["--prune-prompt", "0"], "(0, 1]"), (["--prune-prompt", "2"], "(0, 1]"),
                        (["--prune-prompt", "0.5", "--prune-after-layer", "3"], "--prune-after-layer"),
                        (["--prune-after-layer", "0"], "needs --prune-prompt")):
        r = run_cli("run", str(tiny_folder), "-p", "hi", "-n", "1", *args)
        assert r.exit_code == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output


def test_cli_prunes_and_reports(tiny_folder):
    prompt = "The quick brown fox jumps over the lazy dog. " * 8
    r = run_cli("run", str(tiny_folder), "-p", prompt, "--no-chat", "-n", "4", "--json",
                                 "--prune-prompt", "0.3", "--prune-after-layer", "0", "--kv-budget", "50%")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    prune = out["stats"]["prune"]
    assert prune["after_layer"] == 0 and prune["kept_tokens"] == kept_count(out["prompt_tokens"], 0.3, 4, 32)
    assert len(out["tokens"]) == 4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["essays", "legal"])
def test_smollm2_pruned_prompt_keeps_a_planted_fact(smollm2, kind):
    """4K tokens of real text with a passphrase at 10 % depth and the question at the end: KEEP 0.5
    after layer 2 used to lose it (layer 2's attention does not single it out); the window's words
    point at it now. (benchmarks/fidelity.py measures every kind and depth.)"""
    from edgetok.texts import corpus

    tok = smollm2.tokenizer
    body = tok.encode(corpus(kind, 30000), add_special_tokens=False)[:3900]
    cut = len(body) // 10
    text = tok.decode(body[:cut]) + "\nThe secret passphrase for the vault is 'amber falcon 7319'.\n" + tok.decode(body[cut:])
    messages = [{"role": "user", "content": text + "\n\nWhat is the secret passphrase for the vault?"}]
    result = smollm2.generate(messages, chat=True, max_new_tokens=20, prune_prompt=0.5)
    assert result.stats.prune["kept_tokens"] < 0.55 * result.prompt_tokens
    assert "7319" in result.text
