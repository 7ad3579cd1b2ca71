"""`edgetok bench`: the harness's plan, statistics and quality measures, teacher forcing, skipped
peers, and a whole bench on a tiny random model (results.json and plots). No timed assertions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

import edgetok
from edgetok.bench import harness, systems
from edgetok.bench.forced import generate
from edgetok.bench.systems import REFERENCE, System
from edgetok.errors import EdgetokError
from edgetok.runtimes.engine import GenerationConfig


def test_summarize_median_min_max():
    assert harness.summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert harness.summarize([4.0, 1.0]) == {"median": 2.5, "min": 1.0, "max": 4.0}
    assert harness.summarize([7.5]) == {"median": 7.5, "min": 7.5, "max": 7.5}


def test_quality_agreement_and_kl():
    torch.manual_seed(0)
    ref = torch.randn(8, 50) * 3
    same = harness.quality(ref, ref.clone())
    assert same["greedy_agreement"] == 1.0 and same["kl_mean"] == pytest.approx(0, abs=1e-9)

    other = ref.clone()
    winners = ref.argmax(-1)
    for i in (2, 5):  # make another token the argmax at two of the eight positions
        other[i, (winners[i] + 1) % 50] = ref[i].max() + 1
    q = harness.quality(ref, other)
    assert q["greedy_agreement"] == pytest.approx(6 / 8)
    p, r = ref.double().log_softmax(-1), other.double().log_softmax(-1)
    kl = (p.exp() * (p - r)).sum(-1)
    assert q["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert q["kl_max"] == pytest.approx(kl.max().item(), rel=1e-5)
    with pytest.raises(EdgetokError):
        harness.quality(ref, ref[:4])


def test_plan_interleaves_systems_in_rounds():
    a, b, c = (System(n, "edgetok", "m") for n in (REFERENCE, "b", "c"))
    runs = harness.plan([1024, 4096], [a, b, c], repeat=2)
    assert [(r.round, r.context, r.system.name) for r in runs] == [
        (0, 1024, REFERENCE), (0, 1024, "b"), (0, 1024, "c"), (0, 4096, REFERENCE), (0, 4096, "b"), (0, 4096, "c"),
        (1, 1024, REFERENCE), (1, 1024, "b"), (1, 1024, "c"), (1, 4096, REFERENCE), (1, 4096, "b"), (1, 4096, "c"),
    ]


def _output(prefill: float, decode: float, rss: int) -> dict:
    stats = {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "time_to_first_token_s": 1 / prefill,
             "peak_rss_bytes": rss, "generated_tokens": 4, "kv": {"kind": "contiguous", "resident_bytes": {"device": 10}}}
    return {"tokens": [1, 2, 3, 4], "prompt_tokens": 60, "stats": stats}


def test_aggregate_over_rounds(tmp_path):
    ref, peer = System(REFERENCE, "edgetok", "m"), System("p", "transformers", "dir", peer="transformers")
    outputs = {
        (REFERENCE, 64): [_output(100, 10, 5), _output(300, 30, 7), _output(200, 20, 6)],
        ("p", 64): [_output(50, 40, 9), {"error": "p ran out of memory"}],
    }
    rows = harness.aggregate([ref, peer], [64], outputs, tmp_path)
    r, p = rows
    assert r["runs"] == 3 and r["error"] is None and r["peak_rss_bytes"] == 7
    assert r["decode_tokens_per_s"] == {"median": 20, "min": 10, "max": 30}
    assert r["prefill_tokens_per_s"] == {"median": 200, "min": 100, "max": 300}
    assert p["runs"] == 1 and p["error"] == "p ran out of memory" and p["decode_tokens_per_s"]["median"] == 40
    assert r["quality"] is None and p["quality"] is None  # no logits were written
    [ratio] = harness.ratios(rows, [ref, peer])
    assert ratio == {"edgetok": REFERENCE, "peer": "p", "context": 64, "decode": 0.5, "prefill": 4.0}


def test_parse_contexts_and_peers():
    assert harness.parse_contexts("4096, 1024,8K") == [1024, 4096, 8192]
    for bad in ("", "1024,,2048", "1k5", "0", "-5"):
        with pytest.raises(EdgetokError, match="--contexts"):
            harness.parse_contexts(bad)
    assert systems.parse_peers("transformers,llamacpp") == ["transformers", "llamacpp"]
    assert systems.parse_peers("none") == []
    with pytest.raises(EdgetokError, match="unknown peer 'vllm'"):
        systems.parse_peers("llamacpp,vllm")


def test_edgetok_systems_are_run_options():
    s = systems.edgetok_systems("m", ["100%", "25%", "2048"], ["int8=--weights int8 --kv-budget 25%"])
    assert [x.name for x in s] == [REFERENCE, systems.DEFAULT, "edgetok KV 25%", "edgetok KV 2048", "int8"]
    # the reference and the budgets are the torch backend's, named; the default names nothing
    assert s[0].options == ("--backend", "torch") and s[1].options == ()
    assert s[2].options == ("--backend", "torch", "--kv-budget", "25%")
    assert s[4].options == ("--weights", "int8", "--kv-budget", "25%")
    cmd = s[2].command("ids.json", 16, 2, follow="f.json")
    assert cmd[1:4] == ["-m", "edgetok.bench.forced", "m"] and "--follow" in cmd and "--logits-out" not in cmd
    with pytest.raises(EdgetokError, match="--kv-budget"):
        systems.edgetok_systems("m", ["lots"], [])
    with pytest.raises(EdgetokError, match="NAME=OPTIONS"):
        systems.edgetok_systems("m", [], ["--weights int8"])


def test_teacher_forcing_feeds_the_followed_tokens(tiny_folder):
    prompt = list(range(10, 40))
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    ref, ref_rows = generate(edgetok.load(str(tiny_folder), backend="torch"), prompt, cfg, None)
    assert len(ref_rows) == 6 and ref.tokens == [int(r.argmax()) for r in ref_rows]
    # Following its own greedy tokens reproduces the run exactly.
    same, same_rows = generate(edgetok.load(str(tiny_folder), backend="torch"), prompt, cfg, ref.tokens)
    assert same.tokens == ref.tokens and all(np.array_equal(a, b) for a, b in zip(ref_rows, same_rows))
    # Following other tokens: the rows are the logits after them, the tokens are their argmax.
    other = [(t + 7) % 300 for t in ref.tokens]
    forced, rows = generate(edgetok.load(str(tiny_folder), backend="torch"), prompt, cfg, other)
    free, _ = generate(edgetok.load(str(tiny_folder), backend="torch"), prompt + other[:2],
                       GenerationConfig(max_new_tokens=1, ignore_eos=True), None)
    assert forced.tokens == [int(r.argmax()) for r in rows]
    assert forced.tokens[2] == free.tokens[0]


def test_bad_input_is_one_sentence(tiny_folder, tmp_path):
    cases = [
        (("bench", tmp_path / "nope"), "not found"),
        (("bench", tiny_folder, "--peers", "llamacpp,vllm"), "unknown peer 'vllm'"),
        (("bench", tiny_folder, "--contexts", "1024,big"), "--contexts"),
        (("bench", tiny_folder, "--contexts", "4096", "--peers", "none"), "context 4096 is impossible"),
        (("bench", tiny_folder, "--kv-budget", "150%", "--peers", "none"), "--kv-budget 150%"),
    ]
    for args, fragment in cases:
        r = run_cli(*args, "--out", tmp_path / "out")
        assert r.exit_code == 1, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgetok: error: ") and fragment in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_bench_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):
    # llama.cpp and onnxruntime-genai are installed here; the bench must skip a peer that is not.
    real = systems.installed
    monkeypatch.setattr(systems, "installed", lambda module: module not in ("llama_cpp", "onnxruntime_genai") and real(module))
    out = tmp_path / "bench"
    r = run_cli("bench", tiny_folder, "--contexts", "64", "-n", "5", "--kv-budget", "100%,50%", "--threads", "1",
               "--repeat", "1", "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())

    assert [s["name"] for s in res["systems"]] == [REFERENCE, systems.DEFAULT, "edgetok KV 50%", "transformers fp32"]
    assert set(res["skipped"]) == {"llama.cpp", "onnxruntime-genai"}
    assert "pip install 'edgetok[peers]'" in res["skipped"]["onnxruntime-genai"]
    assert "skipped onnxruntime-genai" in r.stdout
    assert res["complete"] is True
    assert res["command"].startswith("edgetok bench ") and "--repeat 1 " in res["command"]
    assert res["machine"]["cores"] >= 1 and res["versions"]["edgetok"]
    assert res["prompt"]["tokens"] == {"64": 59}
    rows = {row["system"]: row for row in res["results"]}
    for row in rows.values():
        assert row["error"] is None and row["runs"] == 1 and row["context"] == 64
        assert row["prompt_tokens"] == 59 and row["generated_tokens"] == 5
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s"):
            s = row[key]
            assert s["min"] <= s["median"] <= s["max"] and s["min"] > 0
        assert row["peak_rss_bytes"] > 0 and row["kv_resident_bytes"]
    assert rows[REFERENCE]["quality"] is None
    assert set(rows["edgetok KV 50%"]["kv_resident_bytes"]) == {"device", "host", "disk"}
    q = rows["edgetok KV 50%"]["quality"]
    assert 0 <= q["greedy_agreement"] <= 1 and q["kl_mean"] >= 0 and q["positions"] == 5
    # transformers runs the same fp32 weights: fed the reference's tokens it agrees everywhere.
    q = rows["transformers fp32"]["quality"]
    assert q["greedy_agreement"] == 1.0 and q["kl_mean"] < 1e-6
    pairs = {(x["edgetok"], x["peer"]) for x in res["ratios"]}
    assert pairs == {(REFERENCE, "transformers fp32"), (systems.DEFAULT, "transformers fp32"),
                     ("edgetok KV 50%", "transformers fp32")}
    for png in ("decode_vs_context.png", "decode_vs_budget.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ortgenai_peer_is_built_once_and_follows_the_reference(tiny_folder):
    pytest.importorskip("onnxruntime_genai")
    import numpy as np

    from edgetok.bench import artifacts, peers
    from edgetok.models.sources import load_source

    source = load_source(str(tiny_folder))
    folder = artifacts.ortgenai_folder(str(tiny_folder), source)
    built = (folder / "model.onnx").stat().st_mtime_ns
    assert artifacts.ortgenai_folder(str(tiny_folder), source) == folder  # the second bench finds it in the cache
    assert (folder / "model.onnx").stat().st_mtime_ns == built

    prompt, n = harness.prompt_tokens(source.tokenizer, 40), 5
    ref, ref_rows = generate(edgetok.load(str(tiny_folder), backend="torch"), prompt,
                             GenerationConfig(max_new_tokens=n, ignore_eos=True), None)
    step, kv_stats = peers.ortgenai_stepper(folder, 1, len(prompt) + n)
    free, free_rows, stats = peers.timed_decode(step, prompt, n, None)
    assert stats.decode_steps == n - 1 and stats.prefill_tokens_per_s > 0 and stats.peak_rss_bytes > 0
    assert kv_stats()["resident_bytes"]["device"] == source.config.kv_bytes_per_token(4) * (len(prompt) + n)
    # Fed its own greedy tokens, a fresh generator computes the same logits.
    step, _ = peers.ortgenai_stepper(folder, 1, len(prompt) + n)
    forced, forced_rows, _ = peers.timed_decode(step, prompt, n, free)
    assert forced == free and np.allclose(np.stack(forced_rows), np.stack(free_rows), atol=1e-5)
    # int4 weights of a random model: only that the comparison with edgetok's exact run is defined.
    step, _ = peers.ortgenai_stepper(folder, 1, len(prompt) + n)
    _, rows, _ = peers.timed_decode(step, prompt, n, ref.tokens)
    q = harness.quality(torch.from_numpy(np.stack(ref_rows)), torch.from_numpy(np.stack(rows)))
    assert q["positions"] == n and 0 <= q["greedy_agreement"] <= 1 and q["kl_mean"] >= 0


def test_llamacpp_peer_runs_a_gguf_export_and_reports_its_kv(tiny_folder):
    pytest.importorskip("llama_cpp")
    from edgetok.bench import artifacts
    from edgetok.models.sources import load_source

    source = load_source(str(tiny_folder))
    gguf = artifacts.gguf_file(str(tiny_folder), source)  # an HF model: a q8_0 export, cached
    assert gguf.name == f"model-{artifacts.GGUF_QUANT}.gguf" and artifacts.gguf_file(str(tiny_folder), source) == gguf
    prompt, cfg = list(range(10, 40)), GenerationConfig(max_new_tokens=4, ignore_eos=True)
    ref, _ = generate(edgetok.load(str(tiny_folder), backend="torch"), prompt, cfg, None)
    result, rows = generate(edgetok.load(str(gguf), backend="llamacpp", threads=1), prompt, cfg, ref.tokens)
    assert len(rows) == 4 and result.tokens == [int(r.argmax()) for r in rows]
    # llama.cpp allocates f16 K/V for its whole window (the model's context) up front.
    c = source.config
    assert result.stats.kv["resident_bytes"] == {"device": c.kv_bytes_per_token(2) * c.max_context}


def test_disk_tier_reads_are_recorded_and_tabled(tiny_folder, tmp_path):
    """A run whose chunks spill to disk: its decode's disk reads go into the bench's row and table;
    a run without a disk tier has none."""
    from edgetok.bench import report
    from edgetok.runtimes.kv import KVConfig

    kv = KVConfig(budget="100%", device_mb=0.002, host_mb=0.004, disk_dir=tmp_path / "kv", chunk_sizes=(8, 16))
    m = edgetok.load(str(tiny_folder), backend="torch", kv=kv)
    r = m.generate("The quick brown fox jumps over the lazy dog. " * 16, max_new_tokens=16, ignore_eos=True)
    disk = harness.disk_reads(r.stats.kv)
    assert disk is not None and disk["bytes_read_per_token"]["disk"] > 0
    assert disk["sync_disk_reads"] + disk["prefetch_chunks"] > 0
    assert harness.disk_reads({"kind": "contiguous", "resident_bytes": {"device": 10}}) is None
    rows = [{"context": 256, "system": "tiers", "kv_disk": disk}, {"context": 256, "system": "ram", "kv_disk": None}]
    table = report.disk_table({"results": rows}).splitlines()
    assert len(table) == 3 and table[2].startswith("| 256 | tiers | ")
    assert report.disk_table({"results": rows[1:]}) == ""
