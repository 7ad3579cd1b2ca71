"""The tiered KV cache end to end: exactness at a full budget, budgets, tiers, disk, prefetch, CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import kv_rows, run_cli, tiny_source

from edgetok.errors import EdgetokError
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.kv import KVConfig, TieredCache


@pytest.fixture(scope="module")
def source():
    """A tiny random Llama (4 layers) with a 2K context; the tokenizer is not needed here."""
    return tiny_source()


def decode(backend: TorchBackend, prompt: list[int], steps: int, follow: list[int] | None = None):
    """Greedy (or teacher-forced) decode → (tokens, logits (steps, V), cache)."""
    cache = backend.new_cache()
    for i in range(0, len(prompt), 128):
        logits = torch.from_numpy(backend.forward(prompt[i : i + 128], cache)[-1])
    backend.end_prefill(cache)
    tokens, rows = [], []
    for s in range(steps):
        rows.append(logits)
        tokens.append(int(logits.argmax()) if follow is None else follow[s])
        logits = torch.from_numpy(backend.forward([tokens[-1]], cache)[-1])
    return tokens, torch.stack(rows), cache


PROMPT = torch.randint(0, 300, (700,), generator=torch.Generator().manual_seed(5)).tolist()


def test_full_budget_equals_full_attention(source, tmp_path):
    exact = TorchBackend(source)
    want, want_logits, _ = decode(exact, PROMPT, 60)
    configs = [
        KVConfig(budget="100%"),
        KVConfig(budget="100%", device_mb=0.05, host_mb=0.1, disk_dir=tmp_path),  # most chunks on disk
    ]
    for kv in configs:
        backend = TorchBackend(source, kv=kv)
        got, logits, cache = decode(backend, PROMPT, 60)
        assert got == want
        assert (logits - want_logits).abs().max() < 1e-4
        assert cache.stats()["budget_used"] == 1.0
        cache.close()


def test_tiers_keep_their_budgets_and_read_from_disk(source, tmp_path):
    kv = KVConfig(budget="100%", device_mb=0.05, host_mb=0.1, disk_dir=tmp_path, prefetch="on")
    _, _, cache = decode(TorchBackend(source, kv=kv), PROMPT, 40)
    stats = cache.stats()
    assert stats["resident_bytes"]["device"] <= 0.05 * 2**20
    assert stats["resident_bytes"]["host"] <= 0.1 * 2**20
    assert stats["resident_bytes"]["disk"] > 0
    assert stats["bytes_read_per_token"]["disk"] > 0
    assert stats["prefetch_hits"] > 0  # layer i+1's chunks were read while layer i computed
    assert list(tmp_path.iterdir()) == []  # the disk file is unlinked while open: a killed run leaves nothing
    assert os.fstat(cache.storage.store.disk.fd).st_size >= stats["resident_bytes"]["disk"]
    cache.close()
    assert list(tmp_path.iterdir()) == []


def test_budget_limits_what_attention_reads(source):
    exact = TorchBackend(source)
    want, want_logits, _ = decode(exact, PROMPT, 40)
    backend = TorchBackend(source, kv=KVConfig(budget="25%"))
    _, logits, cache = decode(backend, PROMPT, 40, follow=want)
    stats = cache.stats()
    assert 0.15 < stats["budget_used"] <= 0.3
    assert stats["tokens_attended_per_layer"] < 0.3 * (len(PROMPT) + 40)
    assert (logits[1:] - want_logits[1:]).abs().max() > 0.01  # decode attends to a subset ...
    assert (logits[0] - want_logits[0]).abs().max() < 0.1  # ... after an exact prefill (bf16 K/V)


def test_selection_always_keeps_sinks_and_recent_chunks(source):
    backend = TorchBackend(source, kv=KVConfig(budget="10%", sink_tokens=4, recent_tokens=64))
    _, _, cache = decode(backend, PROMPT, 3)
    cache._step_budgets()
    layer = cache.layers[1]
    for seed in range(5):
        q = torch.randn(source.config.num_heads, source.config.head_dim, generator=torch.Generator().manual_seed(seed))
        for ids in cache._select(1, q):  # (per KV head)
            chosen = ids.tolist()
            assert 0 in chosen
            needed_recent = -(-(64 - cache.storage.window_len(layer)) // layer.chunk_size)
            assert set(range(layer.n_chunks - needed_recent, layer.n_chunks)) <= set(chosen)
            assert len(chosen) < layer.n_chunks


def test_low_bit_storage_is_smaller(source, tmp_path):
    sizes = {}
    for bits in ("32", "8", "4"):
        kv = KVConfig(budget="100%" if bits == "32" else "50%", bits=bits, device_mb=0.02)
        _, _, cache = decode(TorchBackend(source, kv=kv), PROMPT, 5)
        sizes[bits] = cache.stats()["resident_bytes"]["host"]
        cache.close()
    assert sizes["4"] < sizes["8"] < sizes["32"] / 3


def test_reset_on_a_new_prompt(source):
    backend = TorchBackend(source, kv=KVConfig(budget="50%"))
    cache = backend.new_cache()
    backend.forward(PROMPT[:300], cache)
    backend.end_prefill(cache)
    assert backend.truncate(cache, 100) == 0 and cache.length == 0  # chunks were fitted to the old prompt
    assert isinstance(cache, TieredCache)


def test_kv_config_errors():
    for bad in (dict(budget="0"), dict(budget="150%"), dict(budget="many"), dict(bits="3"), dict(host_mb=10)):
        with pytest.raises(EdgetokError):
            KVConfig(**bad)


def test_cli_kv_options(tiny_folder, tmp_path):
    r = run_cli("run", str(tiny_folder), "-p", "The quick brown fox", "--no-chat", "-n", "8",
                                 "--kv-budget", "50%", "--kv-device-mb", "0.01", "--kv-host-mb", "0.01",
                                 "--kv-disk", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    kv = json.loads(r.stdout)["stats"]["kv"]
    assert kv["kind"] == "tiered" and set(kv["bytes_read_per_token"]) == {"device", "host", "disk"}
    r = run_cli("run", str(tiny_folder), "-p", "hi", "--kv-budget", "0%")
    assert r.exit_code == 1 and "impossible" in r.stderr
    r = run_cli("run", str(tiny_folder), "-p", "hi", "--kv-host-mb", "4")
    assert r.exit_code == 1 and "--kv-disk" in r.stderr


@pytest.mark.slow
def test_smollm2_full_budget_is_exact_with_tiers(smollm2, tmp_path):
    from edgetok.texts import essays

    prompt = smollm2.tokenizer.encode(essays(8000))[:1200]
    exact = smollm2.engine.backend
    want, _, _ = decode(exact, prompt, 24)
    kv = KVConfig(budget="100%", device_mb=2, host_mb=8, disk_dir=tmp_path)
    tiered = TorchBackend.__new__(TorchBackend)
    tiered.__dict__.update(exact.__dict__, kv=kv)  # same weights, tiered cache
    got, _, cache = decode(tiered, prompt, 24)
    assert got == want
    assert cache.stats()["bytes_read_per_token"]["disk"] > 0
    cache.close()


@pytest.mark.slow
def test_smollm2_quarter_budget_agrees_with_full_attention(smollm2):
    """Real text, 2K tokens, a 25 % budget: the greedy choice matches full attention (teacher-forced)."""
    from edgetok.texts import essays

    prompt = smollm2.tokenizer.encode(essays(12000))[:2048]
    exact = smollm2.engine.backend
    want, want_logits, _ = decode(exact, prompt, 32)
    budgeted = TorchBackend.__new__(TorchBackend)
    budgeted.__dict__.update(exact.__dict__, kv=KVConfig(budget="25%"))
    _, logits, cache = decode(budgeted, prompt, 32, follow=want)
    assert (logits.argmax(-1) == torch.tensor(want)).float().mean() >= 0.9
    assert cache.stats()["budget_used"] < 0.3


def test_without_prefetch_every_read_is_synchronous(source, tmp_path):
    kv = KVConfig(budget="100%", device_mb=0.05, host_mb=0.1, disk_dir=tmp_path, prefetch="off")
    _, _, cache = decode(TorchBackend(source, kv=kv), PROMPT, 20)
    stats = cache.stats()
    assert stats["prefetch_hits"] == 0 and stats["sync_reads"] > 0
    cache.close()


def test_one_token_prompt(tiny_folder):
    import edgetok

    m = edgetok.load(str(tiny_folder), backend="torch", kv=KVConfig(budget="25%"))
    ids = m.tokenizer.encode("a")
    assert len(ids) == 1
    r = m.generate("a", max_new_tokens=5, ignore_eos=True)
    assert len(r.tokens) == 5


@pytest.mark.parametrize("tiers", [False, True])
def test_graph_views_stage_the_selected_chunks_incrementally(tiers, tmp_path):
    """view()/append() as the ONNX backend drives them: the staged buffer holds exactly what the
    selection chose (in any order), with room for the new token, which the graph writes there;
    with tiers, only the chunks that enter the selection are fetched from them."""
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, n = 4, 2, 8, 300
    homes = dict(device_mb=0.01, host_mb=0.02, disk_dir=tmp_path, bits="32") if tiers else {}
    cache = TieredCache(KVConfig(budget="30%", recent_tokens=8, chunk_sizes=(16, 16), selection="layer", **homes), 1, hq, hkv, d,
                        dtype=torch.float32)
    for start in range(0, n, 100):
        k, v, length = cache.view(0, reserve=100)
        assert length == start
        new_k, new_v = torch.randn(1, hkv, 100, d, generator=g).numpy(), torch.randn(1, hkv, 100, d, generator=g).numpy()
        if not tiers:  # the slab itself, with room: the graph writes the new tokens there
            k[:, :, start : start + 100], v[:, :, start : start + 100] = new_k, new_v
            new_k, new_v = k[:, :, start : start + 100], v[:, :, start : start + 100]
        cache.append(0, torch.randn(1, hq, 100, d, generator=g).numpy(), new_k, new_v)
    cache.end_prefill()
    layer, moved = cache.layers[0], 0
    for _ in range(40):
        before = cache.stages.slots(0)
        reads = sum(cache.storage.store.read_chunks.values()) if tiers else 0
        k, v, p = cache.view(0, reserve=1)
        [chosen] = cache._select(0, layer.q_last)  # what the step's view must hold (one set: a graph's)
        # a chunk staged at the last step and chosen again stays in its slot (no copy)
        after = cache.stages.slots(0)
        moved += sum(1 for s, c in enumerate(before) if c >= 0 and c in after and after[s] != c)
        assert k.shape[2] >= p + 1
        if tiers:  # fetched: the chunks not staged before
            assert sum(cache.storage.store.read_chunks.values()) - reads == len(set(chosen.tolist()) - set(before))
            kv = cache.storage.fetch_float(layer.keys[chosen.numpy()])
            want_k = torch.cat([c[0] for c in kv] + [layer.window_k], 1)
            want_v = torch.cat([c[1] for c in kv] + [layer.window_v], 1)
        else:
            want_k, want_v = cache.storage.gather(0, chosen)
        # the same tokens, in another order
        assert p == want_k.shape[1] and kv_rows(k[0, :, :p], v[0, :, :p]) == kv_rows(want_k, want_v)
        k[:, :, p], v[:, :, p] = torch.randn(hkv, d, generator=g).numpy(), torch.randn(hkv, d, generator=g).numpy()
        cache.append(0, torch.randn(1, hq, 1, d, generator=g).numpy(), k[:, :, p : p + 1], v[:, :, p : p + 1])
    assert cache.stats()["budget_used"] < 0.5 and moved == 0
    if tiers:
        assert cache.stats()["resident_bytes"]["disk"] > 0
    cache.close()


@pytest.mark.parametrize("homes", [{}, {"bits": "auto"}, {"bits": "4", "device_mb": 0.05, "host_mb": 0.1, "disk": True}])
def test_decode_attends_through_the_mixed_bit_kernel_as_the_reference_would(homes, tmp_path):
    """A decode step's attention (the native kernel over the chunks where they live: slab rows,
    host and disk homes at 16/8/4 bits, device copies of stored forms) equals the reference —
    the same chunks gathered as float copies, then SDPA — for every layer and step."""
    from edgetok.kernels import mixed_attention
    from edgetok.kernels.attention import attend, attend_lse, causal_mask

    assert mixed_attention.supports(64)
    g = torch.Generator().manual_seed(5)
    hq, hkv, d, layers = 6, 2, 64, 2
    homes = dict(homes)
    if homes.pop("disk", False):
        homes["disk_dir"] = tmp_path
    cache = TieredCache(KVConfig(budget="40%", recent_tokens=16, chunk_sizes=(16, 32), **homes), layers, hq, hkv, d,
                        dtype=torch.float32)
    for i in range(layers):  # a 400-token prompt
        cache.attend(i, *(torch.randn(1, h, 400, d, generator=g) for h in (hq, hkv, hkv)))
    cache.end_prefill()
    for step in range(12):
        t = 1 if step % 4 else 3  # a verified draft now and then: causal within the window
        for i in range(layers):
            q, k, v = (torch.randn(1, h, t, d, generator=g) for h in (hq, hkv, hkv))
            if i == 0:
                cache._begin_step()
            chosen = cache._select(i, q[0, :, -1])  # one set, or in RAM one per KV head
            cache.storage.append(cache.layers[i], k[0], v[0])
            group = hq // len(chosen)
            for h, ids in enumerate(chosen):
                head = None if len(chosen) == 1 else h
                qh = q[:, h * group : (h + 1) * group]
                out, lse, attended = cache.storage.attend(i, ids, qh[0], head=head)
                keys, values = cache.storage.gather(i, ids, head=head)
                ref = attend(qh, keys[None], values[None], causal_mask(t, keys.shape[1]))[0]
                assert attended == keys.shape[1]
                assert (out - ref).abs().max() <= 1e-4
                _, ref_lse = attend_lse(qh[0], keys, values, causal_mask(t, keys.shape[1]))  # what summaries merge through
                assert (lse - ref_lse).abs().max() <= 1e-4
    assert cache.stats()["attention"] == mixed_attention.isas()[0]


@pytest.mark.parametrize("budget", ["100%", "40%"])
def test_the_ops_standard_operator_form_on_an_execution_provider_attends_as_the_native_kernel(source, tmp_path, budget):
    """--kv-op-provider: the tiers hand the op's ONNX form (kernels/mixed_attention_onnx.py, what an
    NPU's provider gets) the chunks as stored, instead of the native kernel: the same tokens and
    logits within float32 rounding, at a full budget (exact) and a partial one (same selection)."""
    tiers = dict(budget=budget, device_mb=0.05, host_mb=0.1, disk_dir=tmp_path)
    want, want_logits, native = decode(TorchBackend(source, kv=KVConfig(**tiers)), PROMPT, 24)
    got, logits, cache = decode(TorchBackend(source, kv=KVConfig(**tiers, op_provider="CPUExecutionProvider")), PROMPT, 24)
    assert got == want
    assert (logits - want_logits).abs().max() < 1e-4
    assert cache.stats()["attention"] == "onnx (CPUExecutionProvider)" and native.stats()["attention"] != cache.stats()["attention"]
    assert cache.stats()["bytes_read_per_token"]["disk"] > 0  # chunks came from every tier, as stored
    for c in (cache, native):
        c.close()


def test_an_op_provider_needs_tiers_and_a_provider_onnxruntime_has(tmp_path):
    with pytest.raises(EdgetokError, match="tier budgets"):
        KVConfig(budget="25%", op_provider="CPUExecutionProvider")
    with pytest.raises(EdgetokError, match="not an execution provider"):
        KVConfig(budget="25%", device_mb=1, op_provider="NoSuchExecutionProvider")
