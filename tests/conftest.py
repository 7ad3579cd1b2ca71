"""Shared fixtures: tiny random models (fast) and the real SmolLM2 (slow, loaded once)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Texts where tokenizers tend to differ: whitespace runs, digits, accents, CJK, emoji, code, special tokens.
TRICKY = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnew lines",
    "numbers 1234567 and 3.14159, 2024-11-29",
    "unicode: café, naïve, 北京, 🙂👍🏽, Ωmega",
    "code: def f(x):\n    return x**2  # square",
    "<|im_start|>user\nhi<|im_end|>\n",
]


TEXT = (
    "The quick brown fox jumps over the lazy dog. Émile paid 12,345 € for a café near the 北京 station. "
    "def add(a, b):\n    return a + b\n"
) * 4


def in_threads(worker, n: int, timeout: float) -> None:
    """worker(i) for i in range(n), each in its own thread, all started before any is joined."""
    import threading

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)


def run_cli(*args, input: str | bytes | None = None):
    """`edgetok ARGS` in this process (click's runner): the result has exit_code, stdout, stderr, output."""
    from click.testing import CliRunner

    from edgetok.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.fixture(scope="session", autouse=True)
def edgetok_home(tmp_path_factory):
    """Converted-model cache of this test session, so tests never depend on the user's cache."""
    home = tmp_path_factory.mktemp("edgetok_home")
    os.environ["EDGETOK_HOME"] = str(home)
    return home


def make_tokenizer_files(folder: Path) -> None:
    """A small byte-level BPE tokenizer with ChatML special tokens, as HF saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None})
    )


HF_CONFIGS = {
    "llama": dict(model_type="llama"),
    "llama3": dict(
        model_type="llama",
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
    "smollm": dict(model_type="llama", tie_word_embeddings=True, rope_theta=100000.0),
    "qwen3": dict(model_type="qwen3", head_dim=32),  # head_dim ≠ hidden / heads, as Qwen3's own
    "qwen3-tied": dict(model_type="qwen3", tie_word_embeddings=True, attention_bias=True),
    "phi3": dict(model_type="phi3", pad_token_id=None),
    # longrope past its pretraining context (max_context 256 > 32: the long factors and the attention
    # factor of 256 / 32; the parity test's 72 tokens make transformers choose them too) and within
    # it (the short factors)
    "phi3-longrope": dict(
        model_type="phi3", pad_token_id=None, original_max_position_embeddings=32,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + i / 16 for i in range(8)],
                      "long_factor": [1.0 + i for i in range(8)]},
    ),
    "phi3-short": dict(
        model_type="phi3", pad_token_id=None, original_max_position_embeddings=256,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + i / 4 for i in range(8)],
                      "long_factor": [2.0 + i for i in range(8)]},
    ),
    # sliding layers (window 8: the tests' prompts cross it) between full ones; a query scale of
    # its own; every norm, GeGLU, the scaled embedding
    "gemma3": dict(model_type="gemma3_text", tie_word_embeddings=True, head_dim=16, sliding_window=8,
                   sliding_window_pattern=2, query_pre_attn_scalar=24, pad_token_id=0),
}


def make_hf_model(kind: str, vocab_size: int, seed: int = 0, layers: int = 2, max_positions: int = 256,
                  hidden: int = 64, intermediate: int = 96, **overrides):
    """A tiny random transformers model of one family (the reference for parity)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(HF_CONFIGS[kind]) | overrides
    model_type = extra.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=extra.pop("tie_word_embeddings", False),
        bos_token_id=None,
        eos_token_id=2,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random init is tiny; scale so attention and logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif model_type == "gemma3_text":  # its norms start at zero (1 + w): make them matter
                p.normal_(0, 0.3)
    return model


def tiny_source(seed: int = 3, layers: int = 4, max_positions: int = 2048):
    """A tiny random Llama as a Source (no tokenizer: for driving backends with token ids)."""
    from edgetok.models.config import ModelConfig
    from edgetok.models.sources import Source

    hf = make_hf_model("llama", vocab_size=300, seed=seed, layers=layers, max_positions=max_positions)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    weights = hf.state_dict()
    return Source("tiny", None, "hf", cfg, None, lambda: weights)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """An HF folder: tiny random Llama (2 layers), real tokenizer files, sharded safetensors."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tokenizer_files(folder)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    model = make_hf_model("llama", vocab)
    model.config.eos_token_id = 2
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder


@pytest.fixture(scope="session")
def tiny_gemma_folder(tmp_path_factory) -> Path:
    """An HF folder: tiny random Gemma 3 (6 layers, the 6th full, as llama.cpp assumes; window 8)."""
    folder = tmp_path_factory.mktemp("tiny-gemma")
    make_tokenizer_files(folder)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    model = make_hf_model("gemma3", vocab, layers=6, sliding_window_pattern=6, query_pre_attn_scalar=16)
    model.config.eos_token_id = 2
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wide_folder(tmp_path_factory):
    """A tiny Llama whose rows are 256 wide (attention, gate/up: K-quants) and 320 (down: a fallback)."""
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("wide")
    make_tokenizer_files(folder)
    hf = make_hf_model("llama", Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(),
                       hidden=256, intermediate=320)
    with torch.no_grad():  # the fixture's 0.15 is large for 256-wide rows: logits would saturate
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(0.3)
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llamacpp_q4_k_m(wide_folder, tmp_path_factory) -> Path:
    """llama.cpp's Q4_K_M of the wide model, made by its own quantizer from edgetok's f32 GGUF: a
    GGUF source whose codes edgetok's rounding did not choose."""
    from edgetok.exporters.llamacpp_quantize import quantize_with_llamacpp

    folder = tmp_path_factory.mktemp("llamacpp")
    f32 = folder / "m.f32.gguf"
    r = run_cli("export", wide_folder, "--format", "gguf", "--quant", "f32", "--no-verify", "-o", f32)
    assert r.exit_code == 0, r.output
    return quantize_with_llamacpp(f32, folder / "m.q4_k_m.gguf", "Q4_K_M")


def optimum_layout(export: Path, hf: Path, out: Path) -> Path:
    """optimum's form of edgetok's `--attention standard` export, built without optimum: the graph
    takes optimum's inputs (input_ids, attention_mask, position_ids, past_key_values.N.key / value)
    and returns its outputs (every new token's logits; present.N.key / value, the past with the new
    K/V after it), beside the HF folder's config.json and tokenizer files (no edgetok.json). Its
    past length is attention_mask's ones before the new tokens: the spare slots the backend masks
    follow them (a real optimum graph masks any slot; tests/bench/test_optimum_peer.py runs one)."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from edgetok.models import names

    model = onnx.load(str(export / "model.onnx"))
    g = model.graph
    layers = sum(1 for i in g.input if i.name.startswith("past_key."))
    renamed = {names.past(kind, i): names.genai_past(kind, i) for i in range(layers) for kind in names.KV_KINDS}
    for node in g.node:
        node.input[:] = [renamed.get(x, x) for x in node.input]
    inputs = [i for i in g.input if i.name not in (names.PAST_LENGTH, names.LOGITS_TO_KEEP)]
    for i in inputs:
        i.name = renamed.get(i.name, i.name)
    inputs.insert(1, helper.make_tensor_value_info(names.GENAI_ATTENTION_MASK, TensorProto.INT64, ["batch", "total"]))
    const = lambda name, values: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    head = [  # edgetok's past_length (1, L) and logits_to_keep from optimum's inputs
        helper.make_node("Shape", [names.INPUT_IDS], ["opt/shape"]),
        const("opt/one", [1]), const("opt/two", [2]), const("opt/1x1", [1, 1]), const("opt/1xL", [1, layers]),
        helper.make_node("Slice", ["opt/shape", "opt/one", "opt/two"], [names.LOGITS_TO_KEEP]),  # every new token's
        helper.make_node("ReduceSum", [names.GENAI_ATTENTION_MASK], ["opt/held"], keepdims=1),  # (1, 1)
        helper.make_node("Reshape", [names.LOGITS_TO_KEEP, "opt/1x1"], ["opt/new"]),
        helper.make_node("Sub", ["opt/held", "opt/new"], ["opt/past"]),
        helper.make_node("Expand", ["opt/past", "opt/1xL"], [names.PAST_LENGTH]),
    ]
    tail = [helper.make_node("Concat", [names.genai_past(kind, i), names.present(kind, i)], [names.genai_present(kind, i)], axis=2)
            for i in range(layers) for kind in names.KV_KINDS]
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    outputs = [next(o for o in g.output if o.name == names.LOGITS)]
    outputs += [helper.make_tensor_value_info(names.genai_present(kind, i), TensorProto.FLOAT, None)
                for i in range(layers) for kind in names.KV_KINDS]
    del g.input[:], g.output[:]
    g.input.extend(inputs)
    g.output.extend(outputs)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (hf / name).is_file():
            shutil.copy(hf / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_optimum_folder(tiny_folder, tmp_path_factory) -> Path:
    """The tiny Llama in optimum's layout (optimum_layout), from its fp32 standard-attention export."""
    root = tmp_path_factory.mktemp("tiny-optimum")
    r = run_cli("export", tiny_folder, "--format", "onnx", "--weights", "fp32", "--attention", "standard",
                "--no-verify", "-o", root / "edgetok")
    assert r.exit_code == 0, r.output
    return optimum_layout(root / "edgetok", tiny_folder, root / "optimum")


@pytest.fixture(scope="session")
def tiny(tiny_folder):
    import edgetok

    return edgetok.load(str(tiny_folder), backend="torch")


def smollm2_path() -> Path:
    from edgetok.models.sources import resolve_path

    return resolve_path("smollm2")


@pytest.fixture(scope="session")
def smollm2():
    import edgetok

    return edgetok.load("smollm2", backend="torch")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own load of the same GGUF (dequantized to fp32): the reference."""
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def essay_text(min_chars: int = 20000) -> str:
    from edgetok.texts import essays

    return essays(min_chars)


def kv_rows(k: torch.Tensor, v: torch.Tensor) -> list[tuple]:
    """Tokens' K/V (..., Hkv, N, D) as a sorted list of (head, key, value) rows: two views that hold
    the same tokens in another order compare equal (attention does not care: keys carry their
    positions), and a key paired with another token's value does not."""
    hkv, d = k.shape[-3], k.shape[-1]
    k, v = k.reshape(hkv, -1, d), v.reshape(hkv, -1, d)
    return sorted((h, *kr, *vr) for h in range(hkv) for kr, vr in zip(k[h].tolist(), v[h].tolist()))
