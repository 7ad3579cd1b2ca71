"""A budgeted cache attended through edgetok's attention operator: the graph runs without a past and
each layer's attention op hands its queries and new K/V to the cache (attention_op.cpp's hook,
OnnxBackend._forward_through). Exact at a full budget, on every tier; the cache's own failures
come back as they were raised."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli

import edgetok
from edgetok.errors import EdgetokError
from edgetok.kernels import mixed_attention, ort_ops

pytestmark = pytest.mark.skipif(not ort_ops.attention_available(), reason="edgetok's attention operator needs AVX2 + FMA")

PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
OPTIONS = dict(max_new_tokens=12, prefill_chunk=24)


@pytest.fixture(scope="module")
def exports(tiny_folder, tiny_gemma_folder, tmp_path_factory) -> dict:
    """The default engine's recipe (int4, float activations: MatMulQ4 and edgetok's attention)."""
    out = {}
    for name, folder in (("llama", tiny_folder), ("gemma", tiny_gemma_folder)):
        out[name] = tmp_path_factory.mktemp(f"through-{name}") / "q4"
        r = run_cli("export", folder, "--format", "onnx", "--weights", "int4", "--activations", "float", "--no-verify",
                    "-o", out[name])
        assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_full_budget_through_the_operator_is_the_exact_cache(exports, family, tmp_path):
    want = edgetok.load(str(exports[family])).generate(PROMPT, **OPTIONS).tokens
    for kv in (edgetok.KVConfig(budget="100%", chunk_sizes=(4, 8)),
               edgetok.KVConfig(budget="100%", chunk_sizes=(4, 8), device_mb=0.01, host_mb=0.01, disk_dir=tmp_path,
                                bits="32")):
        model = edgetok.load(str(exports[family]), kv=kv)
        backend = model.engine.backend
        assert backend.attends_through
        result = model.generate(PROMPT, **OPTIONS)
        assert result.tokens == want
        assert result.stats.kv["attention"] in mixed_attention.isas()  # the mixed-bit kernel ran in the cache


def test_the_ops_onnx_form_on_a_provider_attends_through_the_operator_exactly(exports, tmp_path):
    """--kv-op-provider on the default engine: its attention op hands each layer to the cache, which
    runs the op's standard-operator form on the provider over chunks read from every tier."""
    want = edgetok.load(str(exports["llama"])).generate(PROMPT, **OPTIONS).tokens
    kv = edgetok.KVConfig(budget="100%", chunk_sizes=(4, 8), device_mb=0.01, host_mb=0.01, disk_dir=tmp_path, bits="32",
                          op_provider="CPUExecutionProvider")
    model = edgetok.load(str(exports["llama"]), kv=kv)
    assert model.engine.backend.attends_through
    result = model.generate(PROMPT, **OPTIONS)
    assert result.tokens == want
    assert result.stats.kv["attention"] == "onnx (CPUExecutionProvider)"
    assert result.stats.kv["bytes_read_per_token"]["disk"] > 0


def test_a_small_budget_selects_and_reads_stored_widths(exports, tmp_path):
    kv = edgetok.KVConfig(budget="25%", recent_tokens=8, chunk_sizes=(4, 8), device_mb=0.01, host_mb=0.01,
                          disk_dir=tmp_path, bits="auto")
    result = edgetok.load(str(exports["llama"]), kv=kv).generate(PROMPT, **OPTIONS)
    stats = result.stats.kv
    assert 0 < stats["budget_used"] < 0.6 and stats["decode_steps"] == OPTIONS["max_new_tokens"] - 1
    assert stats["bytes_read_per_token"]["disk"] > 0  # chunks came from the disk tier, layer by layer


def test_summaries_and_per_head_selection_run_on_the_graph(exports):
    """What needed the torch backend (the cache computing attention) runs on ONNX Runtime now."""
    kv = edgetok.KVConfig(budget="25%", recent_tokens=8, chunk_sizes=(4, 8), selection="head", summaries="on")
    model = edgetok.load(str(exports["llama"]), kv=kv)
    assert model.choice.backend == "onnxruntime"
    stats = model.generate(PROMPT, **OPTIONS).stats.kv
    assert stats["selection"] == "head" and stats["summaries"] == "on"


class Failing(Exception):
    pass


def test_the_caches_failure_comes_back_as_raised(exports):
    model = edgetok.load(str(exports["llama"]), kv=edgetok.KVConfig(budget="100%", chunk_sizes=(4, 8)))
    backend = model.engine.backend
    cache = backend.new_cache()

    def attend(layer, q, k, v):
        raise Failing(f"layer {layer}")

    cache.attend = attend
    with pytest.raises(Failing, match="layer 0"):
        backend.forward([5, 6, 7], cache)
    fresh = backend.new_cache()  # the hook is cleared: the next run is whole again
    assert np.isfinite(backend.forward([5, 6, 7], fresh)).all()


def test_the_hook_counts_layers_and_a_refusal_fails_the_run(exports):
    calls = []

    @ort_ops.ATTEND_HOOK
    def hook(_user, layer, q, k, v, s, scale, out):
        calls.append((layer, s))
        return 1  # refuse: the run fails

    backend = edgetok.load(str(exports["llama"])).engine.backend
    with ort_ops.attending_through(hook) as count:
        with pytest.raises(Exception, match="caller's attention failed"):
            backend.session.run(None, _feeds(backend, 3))
        assert count() == 1 and calls == [(0, 3)]
    assert np.isfinite(backend.session.run(None, _feeds(backend, 3))[0]).all()  # outside: the op attends itself


def _feeds(backend, n: int) -> dict:
    c = backend.config
    empty = np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32)
    feeds = {"input_ids": np.arange(5, 5 + n)[None], "position_ids": np.arange(n)[None],
             "past_length": np.zeros((1, c.num_layers), np.int64), "logits_to_keep": np.array([1])}
    for i in range(c.num_layers):
        feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = empty
    return feeds


def test_an_export_without_the_operator_reads_views(tiny_folder, tmp_path):
    out = tmp_path / "int8"
    r = run_cli("export", tiny_folder, "--format", "onnx", "--weights", "int8", "--no-verify", "-o", out)
    assert r.exit_code == 0, r.output
    model = edgetok.load(str(out), kv=edgetok.KVConfig(budget="100%", chunk_sizes=(4, 8)))
    assert not model.engine.backend.attends_through
    with pytest.raises(EdgetokError, match="torch backend"):
        edgetok.load(str(out), kv=edgetok.KVConfig(budget="25%", summaries="on")).generate(PROMPT, **OPTIONS)


def _prefilled_pair(backend, seed: int, n: int, piece: int, *, own_query: bool = False) -> tuple:
    """Two caches prefilled with the same n random tokens: `native` (its decode steps from tables,
    recording each StepTables in native.made) and `python` (every step through attend(), layer by
    layer; own_query: each layer selecting with its own query, not ahead with its last)."""
    ids = [int(i) for i in np.random.default_rng(seed).integers(3, backend.config.vocab_size, n)]
    native, python = backend.new_cache(), backend.new_cache()
    python.step_tables = lambda t: None
    if own_query:
        tiered = getattr(python, "full", python)  # (a MixedCache's full layers are its tiered cache)
        tiered.selects_ahead = False
    made, step_tables = [], native.step_tables
    native.step_tables = lambda t: made.append(step_tables(t)) or made[-1]
    native.made = made
    for cache in (native, python):
        for i in range(0, len(ids), piece):
            backend.forward(ids[i : i + piece], cache)
        backend.end_prefill(cache)
    return native, python


def _decode_alike(backend, native, python, steps: int) -> list:
    """Greedy decode steps on both caches, their logits equal within 2e-4; → the native steps' tables."""
    token = 5
    for _ in range(steps):
        a, b = backend.forward([token], native)[-1], backend.forward([token], python)[-1]
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)
        token = int(np.argmax(b))
    made = [t for t in native.made if t is not None]  # (prefill pieces have none)
    assert len(made) == steps  # every decode step from tables
    return made



def _drafts_alike(backend, native, python, rounds: int, t: int = 4) -> list:
    """Drafts of t − 1 tokens verified on both caches (one forward of t tokens each), their t rows of
    logits equal within 2e-4, then all but the first two tokens rolled back (a rejected draft); →
    the native steps' tables."""
    rng, token = np.random.default_rng(3), 5
    for _ in range(rounds):
        tokens = [token, *(int(i) for i in rng.integers(3, backend.config.vocab_size, t - 1))]
        a, b = backend.forward(tokens, native, last=t), backend.forward(tokens, python, last=t)
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)
        kept = native.length - (t - 2)
        assert backend.truncate(native, kept) == backend.truncate(python, kept) == kept
        token = int(np.argmax(b[1]))
    made = [m for m in native.made if m is not None and m.tokens == t]
    assert len(made) == rounds  # every draft from tables
    return made


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("own_query", [True, False])
def test_a_draft_verified_natively_attends_as_the_cache_does_layer_by_layer(exports, tmp_path, family, own_query):
    """A draft's tokens in one native step — slabs selected with the step's last query (own_query),
    or tables selected ahead with the last step's (tiers in host and disk) — give the logits of
    attend() layer by layer, Gemma's sliding windows sliding for the draft's later tokens; rolling
    the rejected tokens back leaves both caches alike for the next draft and the next step."""
    tiers = {} if own_query else dict(device_mb=0.01, host_mb=0.01, disk_dir=tmp_path)
    kv = edgetok.KVConfig(budget="25%", recent_tokens=8, chunk_sizes=(4, 8), selection="layer", bits="32", **tiers)
    backend = edgetok.load(str(exports[family]), kv=kv).engine.backend
    native, python = _prefilled_pair(backend, seed=4, n=60, piece=20, own_query=own_query)
    made = _drafts_alike(backend, native, python, 6)  # (Gemma's 8-token window: the drafts slide past it)
    # slabs take the new tokens inside the step; tables (the tiers', Gemma's windows) after it
    assert all(m.from_tables == (not own_query or family == "gemma") for m in made)
    native.made.clear()
    _decode_alike(backend, native, python, 3)


@pytest.mark.parametrize("selection", ["layer", "head"])
@pytest.mark.parametrize("budget", ["25%", "auto"])
def test_a_native_step_attends_as_the_cache_does_layer_by_layer(exports, selection, budget):
    """A decode step attended by the native hook — each layer's K/V in its slab, its chunks selected
    there with the step's own query — gives the logits, the budgets, the coverage estimates and the
    captured mass of the cache's own attend() layer by layer (the hook in Python, selecting with
    the same query), selection shared by a layer's heads or each KV head its own."""
    kv = edgetok.KVConfig(budget=budget, recent_tokens=8, chunk_sizes=(4, 8), selection=selection)
    backend = edgetok.load(str(exports["llama"]), kv=kv).engine.backend
    native, python = _prefilled_pair(backend, seed=1, n=90, piece=30, own_query=True)
    made = _decode_alike(backend, native, python, 18)  # (two sampled steps: the 1st and the 17th)
    assert all((t.slabs[:, 0] != 0).all() and not t.from_tables for t in made)  # every layer in its slab
    ours, theirs = native.stats(), python.stats()
    assert ours["budget_per_layer"] == theirs["budget_per_layer"] and ours["budget_used"] < 1
    assert ours["captured_mass_samples"] == theirs["captured_mass_samples"] == 2 * backend.config.num_layers
    assert abs(ours["captured_mass"] - theirs["captured_mass"]) < 1e-4
    assert abs(ours["captured_mass_min_head"] - theirs["captured_mass_min_head"]) < 1e-4
    assert abs(ours["coverage_estimated"] - theirs["coverage_estimated"]) < 1e-4
    spent = ours["native_ms_per_step"]  # where the native steps' time went
    # (measuring scores only the unread chunks: at these sizes it may round to 0 ms)
    assert spent["attend"] > 0 and spent["select"] > 0 and spent["measure"] >= 0 and "native_ms_per_step" not in theirs


def test_tiered_tables_attend_as_the_cache_does_layer_by_layer(exports, tmp_path):
    """Chunks in host and disk tiers: their tables are made before the step, each layer's chunks
    selected with its last query, as attend() selects layer by layer ahead."""
    kv = edgetok.KVConfig(budget="25%", recent_tokens=8, chunk_sizes=(4, 8), device_mb=0.01, host_mb=0.01,
                          disk_dir=tmp_path, bits="32")
    backend = edgetok.load(str(exports["llama"]), kv=kv).engine.backend
    native, python = _prefilled_pair(backend, seed=1, n=90, piece=30)
    made = _decode_alike(backend, native, python, 6)
    assert all(t.from_tables and not t.slabs.any() for t in made)  # tables made before each run, no slab
    assert native.stats()["budget_used"] == python.stats()["budget_used"] < 1


def test_gemmas_windows_and_tiers_attend_natively_as_layer_by_layer(exports):
    """Gemma 3's sliding layers (their windows, one row each) and full layers (the tiered cache's
    tables) in one native step give the logits of attend() layer by layer."""
    # (float32 K/V: the windows' own attend() computes in the storage dtype, bf16 under --kv-bits
    # auto, where the native op keeps float32 queries and sums)
    kv = edgetok.KVConfig(budget="25%", recent_tokens=8, chunk_sizes=(4, 8), selection="layer", bits="32")
    backend = edgetok.load(str(exports["gemma"]), kv=kv).engine.backend
    native, python = _prefilled_pair(backend, seed=2, n=60, piece=20, own_query=True)
    made = _decode_alike(backend, native, python, 12)  # past the 8-token window
    full = sorted(native.slot)  # the full layers: in their slabs; the sliding ones: a table row each
    assert all(t.from_tables and (t.slabs[full, 0] != 0).all() for t in made)
