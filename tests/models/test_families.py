"""Qwen3 (QK-norm) and Phi-3 (fused checkpoints, longrope) through every path: an HF folder of each
loads and runs, exports to ONNX (onnxruntime), GGUF (llama.cpp) and back to an HF folder."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model, make_tokenizer_files, run_cli

import edgetok
from edgetok.errors import EdgetokError
from edgetok.exporters.gguf import export_gguf
from edgetok.exporters.verify import model_logits
from edgetok.models.config import ModelConfig
from edgetok.models.llama import LlamaModel
from edgetok.models.sources import load_source
from edgetok.runtimes.backends.llamacpp import llamacpp_logits

KINDS = ("qwen3", "phi3", "phi3-longrope")
TOKENS = list(range(3, 75))  # 72 > 32: phi3-longrope past its pretraining context


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """HF folders (saved by transformers, tokenizer files beside) and their transformers models."""
    from tokenizers import Tokenizer

    out = {}
    for kind in KINDS:
        # not named after the family: llama.cpp looks up Phi-3's <|end|> token in a model whose
        # general.name says phi3, and this tokenizer has none
        folder = tmp_path_factory.mktemp("model")
        make_tokenizer_files(folder)
        hf = make_hf_model(kind, Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(), seed=5, layers=3)
        hf.save_pretrained(folder)
        out[kind] = folder, hf
    return out


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("kind", KINDS)
def test_hf_folder_loads_and_runs_as_transformers(folders, kind):
    folder, hf = folders[kind]
    src = load_source(str(folder))
    assert src.config.arch == kind.split("-")[0] and src.config.qk_norm == (kind == "qwen3")
    assert not [n for n in src.weights if "qkv_proj" in n or "gate_up_proj" in n]  # Phi-3's stacks split on load
    got = model_logits(LlamaModel.from_state_dict(src.config, src.weights), TOKENS)
    assert (got - hf_logits(hf, TOKENS)).abs().max().item() <= 1e-4
    model = edgetok.load(str(folder))
    assert len(model.generate("The quick brown fox", max_new_tokens=6).tokens) == 6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weights", ["fp32", "fp16", "int8", "int4"])
def test_onnx_export_runs_in_onnxruntime(folders, kind, weights, tmp_path):
    folder, _ = folders[kind]
    out = tmp_path / "onnx"
    r = run_cli("export", folder, "--format", "onnx", "--weights", weights, "--eval-tokens", "64", "-o", out)
    assert r.exit_code == 0, r.output
    parity = json.loads((out / "edgetok.json").read_text())["parity"]
    if weights == "fp32":
        assert parity["top1_agreement"] == 1.0 and parity["max_abs_dlogit"] < 1e-3
    else:  # quantized: close to the fp32 reference, the finer the closer
        assert parity["kl_mean"] < {"fp16": 1e-4, "int8": 0.01, "int4": 0.5}[weights], parity
    prompt = "The quick brown fox"
    got = edgetok.load(str(out)).generate(prompt, max_new_tokens=8).tokens
    if weights == "fp32":
        assert got == edgetok.load(str(folder), backend="torch").generate(prompt, max_new_tokens=8).tokens


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_export_runs_in_llamacpp(folders, kind, tmp_path):
    """llama.cpp loads edgetok's qwen3 / phi3 GGUF (phi3: gate and up stacked in ffn_up, longrope's
    factors as tensors, its attention factor in the metadata) and computes the same logits."""
    folder, hf = folders[kind]
    src = load_source(str(folder))
    path = export_gguf(src, tmp_path / "model.gguf", "f32")
    want = hf_logits(hf, TOKENS)
    assert (llamacpp_logits(path, TOKENS) - want).abs().max().item() < 0.05  # llama.cpp keeps K/V in f16
    back = load_source(str(path))  # edgetok reads it back exactly
    assert back.config.arch == src.config.arch and back.config.qk_norm == src.config.qk_norm
    got = model_logits(LlamaModel.from_state_dict(back.config, back.weights), TOKENS)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quant,method,kl", [("q8_0", "rtn", 0.01), ("q4_0", "gptq", 0.5)])
def test_quantized_gguf_export_reports_its_parity(folders, kind, quant, method, kl, tmp_path):
    """gptq's codes are written as they are: Phi-3's gate and up codes stacked into one ffn_up."""
    folder, _ = folders[kind]
    out = tmp_path / "m.gguf"
    calib = ["--calib-tokens", "512"] if method == "gptq" else []
    r = run_cli("export", folder, "--format", "gguf", "--quant", quant, "--method", method, *calib,
                "--eval-tokens", "64", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.output[r.output.index("{"):])
    assert m["architecture"] == kind.split("-")[0] and m["parity"]["kl_mean"] < kl, m["parity"]
    assert len(edgetok.load(str(out), backend="llamacpp").generate("The quick", max_new_tokens=4).tokens) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_hf_export_is_the_familys_own_layout(folders, kind, tmp_path):
    """An HF folder written by edgetok loads in transformers as the family (Phi-3 stacked again)."""
    from transformers import AutoModelForCausalLM

    folder, hf = folders[kind]
    out = tmp_path / "hf"
    r = run_cli("export", folder, "--format", "hf", "-o", out)
    assert r.exit_code == 0, r.output
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again) is type(hf)
    assert (hf_logits(again, TOKENS) - hf_logits(hf, TOKENS)).abs().max().item() <= 1e-5


def phi3_config(**changes) -> dict:
    base = {"model_type": "phi3", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 4096, "original_max_position_embeddings": 1024,
            "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    return base | changes


def test_phi3_configs_as_their_checkpoints_spell_them():
    """Phi-3's first checkpoints call longrope "su" and keep the pretraining context at the top level."""
    cfg = ModelConfig.from_hf(phi3_config())
    assert cfg.rope_scaling["rope_type"] == "longrope" and cfg.rope_scaling["original_max_position_embeddings"] == 1024
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_hf(phi3_config(rope_scaling=None)).rope_scaling is None


@pytest.mark.parametrize("changes,words", [
    ({"partial_rotary_factor": 0.75}, "partial rotary"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8}}, "short_factor needs 8"),
])
def test_configs_edgetok_cannot_run_are_one_sentence(changes, words):
    with pytest.raises(EdgetokError, match=words):
        ModelConfig.from_hf(phi3_config(**changes))


def test_qwen3_output_bias_is_refused_for_gguf(tmp_path):
    """llama.cpp's qwen3 has no attention output bias: the export says so and writes nothing."""
    folder = tmp_path / "biased"
    folder.mkdir()
    make_tokenizer_files(folder)
    make_hf_model("qwen3-tied", 400).save_pretrained(folder)  # attention_bias: q, k, v and o
    r = run_cli("export", folder, "--format", "gguf", "--quant", "f16", "-o", tmp_path / "m.gguf")
    assert r.exit_code == 1 and "output bias" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m.gguf").exists()
