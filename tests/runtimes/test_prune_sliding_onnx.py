"""Prompt pruning inside the ONNX graph on a model with sliding-window layers (a tiny random
Gemma 3): the graph's later sliding layers mask by the kept tokens' positions, as the torch
backend's caches do (test_prune_sliding.py), in the exact cache and the budgeted one's windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_hf_model, make_tokenizer_files, run_cli
from test_prune import decode  # tests/runtimes/test_prune.py

from edgetok.errors import EdgetokError
from edgetok.models.sources import load_source
from edgetok.runtimes.backends.onnxruntime import OnnxBackend
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.kv import ContiguousCache, KVConfig, MixedCache
from edgetok.runtimes.prune import PrunePlan

WINDOW = 40  # longer than the observation window (32, always kept), shorter than the gaps a 0.3 keep leaves
AFTER = 1  # the prune layer (sliding); after it sliding 3, 4 and full 2, 5
N = 300
PROMPT = [int(t) for t in np.random.default_rng(11).integers(3, 400, N)]
STEPS = 2 * WINDOW + 4  # decode steps: past the window, where positions and slots mask alike again
KV = KVConfig(budget="100%", chunk_sizes=(8, 16))  # MixedCache: windows for the sliding layers, exact


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-gemma-prune")
    make_tokenizer_files(out)
    hf = make_hf_model("gemma3", 400, seed=5, layers=6, max_positions=1024, sliding_window=WINDOW,
                       sliding_window_pattern=3, query_pre_attn_scalar=16)
    hf.save_pretrained(out)
    return out


def export(folder, out, *flags):
    r = run_cli("export", folder, "--format", "onnx", "--weights", "fp32", "-o", out, "--eval-tokens", "64", *flags)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def exports(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma-exports")
    return export(folder, root / "plain"), export(folder, root / "pruning", "--prune-after-layer", str(AFTER))


@pytest.fixture(scope="module")
def onnx(exports):
    return OnnxBackend(load_source(str(exports[1])))


@pytest.fixture(scope="module")
def reference(folder):
    return TorchBackend(load_source(str(folder)))


def plan(keep: float) -> PrunePlan:
    return PrunePlan(keep, AFTER)  # (the tokens the window's rare words refer to too, as the CLI's)


def pruned(backend, keep: float, cache=None):
    """→ greedy tokens, logits (STEPS, V) (the first row the prefill's), kept positions, the cache."""
    cache = cache or backend.new_cache()
    out = backend.prefill_pruned(PROMPT, cache, plan(keep), 64)
    return decode(backend, cache, torch.from_numpy(out.logits), STEPS) + (out.kept, cache)


def test_the_export_has_positions_only_where_needed(onnx, exports):
    plain = OnnxBackend(load_source(str(exports[0])))
    inputs = lambda b: {i.name for i in b.session.get_inputs()}  # noqa: E731
    assert onnx.positioned == [3, 4] and "past_positions" in inputs(onnx)
    assert "past_positions" not in inputs(plain) and onnx.manifest.io["inputs"][4:7] == ["prune_keep", "prune_forced", "past_positions"]


def test_keep_all_equals_the_unpruned_export(onnx, exports):
    """keep 1.0 through the pruning graph (one run, every position kept in order) decodes as the
    export without a pruning point prefilled in pieces."""
    plain = OnnxBackend(load_source(str(exports[0])))
    cache = plain.new_cache()
    for i in range(0, N, 64):
        logits = plain.forward(PROMPT[i : i + 64], cache)[-1]
    want, want_logits = decode(plain, cache, torch.from_numpy(logits), STEPS)
    got, got_logits, kept, _ = pruned(onnx, 1.0)
    assert kept.tolist() == list(range(N))
    assert got == want
    assert (got_logits - want_logits).abs().max() < 1e-4


@pytest.mark.parametrize("kv", [None, KV], ids=["exact", "windows"])
def test_pruned_onnx_agrees_with_torch(onnx, reference, kv):
    """keep 0.3: the same kept tokens, then the prefill's and every decode step's logits, past the
    window, as the torch backend's pruned run (which masks by position: test_prune_sliding.py)."""
    want, want_logits, want_kept, _ = pruned(reference, 0.3, reference.new_cache(kv))
    cache = onnx.new_cache(kv)
    assert isinstance(cache, MixedCache if kv else ContiguousCache)
    got, got_logits, kept, cache = pruned(onnx, 0.3, cache)
    assert kept.tolist() == want_kept.tolist() and len(kept) == 90
    assert set(np.flatnonzero(plan(0.3).forced(PROMPT))) <= set(kept.tolist())  # (some: the rare words' places)
    assert plan(0.3).forced(PROMPT).any()
    assert int(np.diff(kept).max()) >= WINDOW  # gaps a window of slots would count as one step
    assert got == want
    assert (got_logits - want_logits).abs().max() < 1e-4
    if kv:
        sliding = cache.sliding[3]
        assert sliding.gaps and sliding.end == N + STEPS - 1
        cache.close()


def test_the_bias_matters(onnx, folder, tmp_path):
    """The same export with the positions fed as if slots were consecutive (the mistake: a window
    of stored tokens) decodes differently: the check above would see a graph that ignored them."""
    cache = onnx.new_cache()
    good = onnx.prefill_pruned(PROMPT, cache, plan(0.3), 64)
    onnx.end_prefill(cache)
    step = onnx.forward([good.logits.argmax()], cache)[-1]
    wrong = onnx.new_cache()
    onnx.prefill_pruned(PROMPT, wrong, plan(0.3), 64)
    onnx.end_prefill(wrong)
    for i in onnx.positioned:
        wrong.kept[i] = None  # its slots read as consecutive positions
    assert np.abs(onnx.forward([good.logits.argmax()], wrong)[-1] - step).max() > 1e-3


def test_rollback_after_a_pruned_prompt(onnx):
    """A rejected draft after a pruned prompt: truncating and running the tokens again agrees."""
    for kv in (None, KV):
        cache = onnx.new_cache(kv)
        onnx.prefill_pruned(PROMPT, cache, plan(0.3), 64)
        onnx.end_prefill(cache)
        first = onnx.forward([5, 6, 7], cache, last=3)
        assert onnx.truncate(cache, N + 1) == N + 1
        again = onnx.forward([6, 7], cache, last=2)
        assert np.abs(first[-2:] - again).max() < 1e-4
        if kv:
            cache.close()


def test_batched_decoding_feeds_each_rows_positions(onnx):
    """Two pruned prompts (one kept 0.3, one 0.6: different gaps) decoding in one batch give each
    row's logits as decoding alone does."""
    alone, caches = [], []
    for keep in (0.3, 0.6):
        cache, ref = onnx.new_cache(), onnx.new_cache()
        onnx.prefill_pruned(PROMPT, cache, plan(keep), 64)
        onnx.prefill_pruned(PROMPT, ref, plan(keep), 64)
        onnx.end_prefill(cache)
        onnx.end_prefill(ref)
        alone.append(np.stack([onnx.forward([t], ref)[-1] for t in range(10, 10 + STEPS)]))
        caches.append(cache)
    together = np.stack([onnx.forward_batch([t, t], caches) for t in range(10, 10 + STEPS)], 1)  # (2, steps, V)
    assert np.abs(together - np.stack(alone)).max() < 1e-4
    # and back in its own cache, decoding goes on from where the batch left it
    after = onnx.forward([99], caches[0])[-1]
    assert np.isfinite(after).all()


def test_what_still_cannot_prune_says_so(folder, tmp_path):
    r = run_cli("export", folder, "--format", "onnx", "--weights", "fp32", "--attention", "standard",
                "--prune-after-layer", str(AFTER), "-o", tmp_path / "std", "--no-verify")
    assert r.exit_code == 1 and "needs --attention gqa" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "std").exists()
    r = run_cli("export", folder, "--format", "onnx", "--weights", "fp32", "--prune-after-layer", "5",
                "-o", tmp_path / "late", "--no-verify")
    assert r.exit_code == 1 and "between 0 and 4" in r.output and not (tmp_path / "late").exists()


def test_a_tiered_cache_of_sliding_layers_refuses_positions():
    cache = KVConfig(budget="50%")
    from edgetok.runtimes.kv import budgeted_cache

    tiered = budgeted_cache(cache, [8, 8], 4, 2, 16, dtype=torch.float32, reads="views")
    with pytest.raises(EdgetokError, match="does not track its tokens' positions"):
        tiered.positions(1)
