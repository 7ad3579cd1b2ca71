"""GGUF export read by llama.cpp, and the llama.cpp backend (llama-cpp-python)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import TRICKY, essay_text, run_cli

import edgetok
from edgetok.errors import EdgetokError

# Prompts whose greedy continuations have clear margins. Where the two best logits are within
# ~0.1 (e.g. "What is the capital of France?": "The" 25.33 vs "L" 25.24), llama.cpp's 8-bit
# activation quantization in q8_0 dot products can flip the choice; f16 has no such rounding.
PROMPTS = ["List three fruits.", "Explain what a CPU does in two sentences.", "Translate 'good morning' to Spanish."]


def export(*args):
    r = run_cli("export", *map(str, args), "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    export(tiny_folder, "--format", "gguf", "--quant", "f32", "-o", out, "--eval-tokens", "64")
    return out


def test_llamacpp_tokenizer_matches_edgetok(smollm2):
    import llama_cpp

    llm = llama_cpp.Llama(str(smollm2.source.path), vocab_only=True, verbose=False)
    for text in TRICKY + [essay_text(20000)]:
        want = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert smollm2.tokenizer.encode(text) == want, text[:40]


def test_llamacpp_backend_matches_torch_on_tiny_model(tiny_gguf):
    torch_model = edgetok.load(str(tiny_gguf), backend="torch")
    llama = edgetok.load(str(tiny_gguf), backend="llamacpp")
    for prompt in ("The quick brown fox", "def add(a, b):"):
        a = torch_model.generate(prompt, max_new_tokens=24, ignore_eos=True)
        b = llama.generate(prompt, max_new_tokens=24, ignore_eos=True)
        assert a.tokens == b.tokens and a.text == b.text
    stream = llama.stream("The quick", max_new_tokens=12, ignore_eos=True)
    assert "".join(stream) == stream.result.text and stream.result.stats.decode_tokens_per_s > 0


def test_manifest_reports_parity(tiny_gguf):
    m = json.loads(tiny_gguf.with_name(tiny_gguf.name + ".json").read_text())
    assert m["format"] == "gguf" and m["quant"] == "f32"
    assert m["parity"]["top1_agreement"] == 1.0 and m["parity"]["max_abs_dlogit"] < 0.05  # f16 KV cache
    assert m["parity"]["tokens"] == 64


def test_quantized_exports_order_by_quality(tiny_folder, tmp_path):
    kl = {}
    for quant in ("q8_0", "q4_0"):
        m = export(tiny_folder, "--format", "gguf", "--quant", quant, "-o", tmp_path / f"{quant}.gguf", "--eval-tokens", "128")
        kl[quant] = m["parity"]["kl_mean"]
    assert 0 < kl["q8_0"] < kl["q4_0"]


def test_keep_sensitive_keeps_measured_tensors(tiny_folder, tmp_path):
    import gguf

    out = tmp_path / "keep.gguf"
    m = export(tiny_folder, "--format", "gguf", "--quant", "q4_0", "-o", out, "--keep-sensitive", "--eval-tokens", "64")
    kept = m["kept_at_higher_precision"]
    assert kept["lm_head.weight"] == "q8_0"  # the output projection, always (llama.cpp's rule)
    measured = sorted(m["sensitivity_kl"], key=m["sensitivity_kl"].get, reverse=True)
    assert len(measured) == 2 * 2 + 1  # embedding + attn_v and ffn_down of 2 layers
    assert measured[0] in kept and measured[-1] not in kept
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["output.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    from edgetok.exporters.gguf import gguf_name

    assert all(types[gguf_name(name)] == "Q8_0" for name in kept)


def test_export_errors(tiny_folder, tiny_gguf, tmp_path):
    r = run_cli("export", str(tiny_folder), "--format", "gguf", "-o", str(tiny_gguf))
    assert r.exit_code == 1 and "--force" in r.stderr
    r = run_cli("run", str(tiny_folder), "-p", "hi", "--backend", "llamacpp")
    assert r.exit_code == 1 and "runs GGUF files" in r.stderr
    r = run_cli("run", str(tiny_folder), "-p", "hi", "--kv-type", "q8_0")
    assert r.exit_code == 1 and "--backend llamacpp" in r.stderr
    with pytest.raises(EdgetokError, match="unknown backend"):
        edgetok.load(str(tiny_gguf), backend="vulkan")


def test_llamacpp_loads_the_export_without_warnings(tiny_gguf):
    code = f"import llama_cpp; llama_cpp.Llama({str(tiny_gguf)!r}, n_ctx=64, verbose=True)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "llama_model_loader" in p.stderr  # it did log the load
    assert not [line for line in p.stderr.splitlines() if "warn" in line.lower()]


@pytest.fixture(scope="module")
def smollm2_q8(tmp_path_factory):
    out = tmp_path_factory.mktemp("q8") / "smollm2-q8_0.gguf"
    export("smollm2", "--format", "gguf", "--quant", "q8_0", "-o", out, "--eval-tokens", "256")
    return out


@pytest.mark.slow
def test_q8_round_trip_greedy_matches_torch_reference(smollm2, smollm2_q8):
    llama = edgetok.load(str(smollm2_q8), backend="llamacpp")
    for prompt in PROMPTS:
        want = smollm2.generate(prompt, chat=True, max_new_tokens=32).tokens
        got = llama.generate(prompt, chat=True, max_new_tokens=32).tokens
        assert got == want, prompt
    m = json.loads(smollm2_q8.with_name(smollm2_q8.name + ".json").read_text())
    assert m["parity"]["top1_agreement"] > 0.9 and m["parity"]["kl_mean"] < 0.01


@pytest.mark.slow
def test_llamacpp_kv_types_run(smollm2_q8):
    for kv in ("q8_0", "q4_0"):
        r = run_cli("run", str(smollm2_q8), "--backend", "llamacpp", "--kv-type", kv, "-p",
                                     "What is the capital of France?", "-n", "12", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["stats"]["decode_tokens_per_s"] > 0
