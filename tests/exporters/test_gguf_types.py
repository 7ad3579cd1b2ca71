"""GGUF's K-quant and iq4_nl blocks (exporters/kquants.py) and the type plan (gguf_types.py):
llama.cpp reads the blocks as written, and every tensor's type and fallback is said."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import run_cli
from gguf.quants import dequantize, quantize

import edgetok
from edgetok.exporters import kquants
from edgetok.exporters.gguf import tensor_layout
from edgetok.exporters.gguf_types import choose_type, input_rounding, plan_summary, round_to_int8_blocks, round_trip
from edgetok.exporters.sensitivity import Mix, Rounded
from edgetok.exporters.verify import compare, model_logits
from edgetok.models.llama import LlamaModel
from edgetok.models.sources import load_source
from edgetok.runtimes.backends.llamacpp import llamacpp_logits


def rows(n: int = 64, k: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with an outlier channel, a zero row and a constant row: what blocks must survive."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 10
    w[1] = 0
    w[2] = 0.01
    return w


def relative_error(w: torch.Tensor, kind: str) -> float:
    qt = gguf.GGMLQuantizationType[kind.upper()]
    data = kquants.quantize_rows(w, kind) if kind in kquants.TYPES else quantize(w.numpy(), qt)
    back = torch.from_numpy(dequantize(data, qt).reshape(w.shape))
    return ((back - w) ** 2).sum().item() / (w**2).sum().item()


@pytest.mark.parametrize("kind", kquants.TYPES)
def test_blocks_have_llamacpps_size_and_decode_close(kind):
    """gguf-py decodes the bytes as llama.cpp does: the right size, zeros exact, a small error."""
    w = rows()
    data = kquants.quantize_rows(w, kind)
    values, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]]
    assert data.dtype == np.uint8 and data.shape == (64, 512 // values * size)
    back = round_trip(w, kind)
    assert torch.equal(back[1], torch.zeros(512))
    assert relative_error(w, kind) < {"q4_k": 0.01, "iq4_nl": 0.01, "q5_k": 0.003, "q6_k": 0.001}[kind]
    # pieces of rows give the same bytes as all rows at once
    np.testing.assert_array_equal(kquants.quantize_rows(w, kind, chunk_rows=5), data)


def test_finer_types_are_closer():
    """At equal or more bits per weight, each type beats the 32-value type it would replace."""
    w = rows(seed=1)
    err = {kind: relative_error(w, kind) for kind in ("q4_0", "iq4_nl", "q4_k", "q5_0", "q5_k", "q6_k")}
    assert err["q4_k"] < err["iq4_nl"] < err["q4_0"]
    assert err["q5_k"] < err["q5_0"] and err["q6_k"] < err["q5_k"]


def test_type_plan_says_every_fallback_and_why():
    assert choose_type("blk.0.ffn_down.weight", (576, 1536), "q4_k").type == "q4_k"
    t = choose_type("blk.0.attn_q.weight", (576, 576), "q4_k")
    assert (t.asked, t.type) == ("q4_k", "iq4_nl") and "576" in t.why and "256" in t.why
    assert choose_type("x", (8, 576), "q6_k").type == "q8_0" and choose_type("x", (8, 576), "q5_k").type == "q5_0"
    t = choose_type("x", (8, 100), "q4_k")  # neither 256 nor 32 divides 100: two steps, both said
    assert t.type == "f16" and t.why.count("not whole") == 2
    assert choose_type("blk.0.attn_norm.weight", (576,), "q4_k").type == "f32"
    assert choose_type("x", (8, 100), "f16").why == ""
    lines = plan_summary([t, choose_type("y", (8, 512), "q4_k")])
    assert lines[0] == "tensor types: 1 f16, 1 q4_k" and "f16 instead of q4_k for 1 tensors" in lines[1]


@pytest.mark.parametrize("kind,fallback", [("q4_k", "iq4_nl"), ("q5_k", "q5_0"), ("q6_k", "q8_0"), ("iq4_nl", None)])
def test_every_type_written_runs_in_llamacpp(wide_folder, kind, fallback, tmp_path):
    out = tmp_path / f"{kind}.gguf"
    r = run_cli("export", wide_folder, "--format", "gguf", "--quant", kind, "--eval-tokens", "64", "-o", out)
    assert r.exit_code == 0, r.output
    assert "tensor types:" in r.output
    report = json.loads((tmp_path / f"{kind}.gguf.json").read_text())
    plan = {t["tensor"]: t for t in report["type_plan"]}
    assert plan["blk.0.attn_q.weight"]["type"] == kind and plan["blk.0.attn_norm.weight"]["type"] == "f32"
    if fallback:
        assert plan["blk.0.ffn_down.weight"]["type"] == fallback and "320" in plan["blk.0.ffn_down.weight"]["why"]
        assert f"{fallback} instead of {kind}" in r.output
    assert plan["output.weight"]["type"] == "q8_0"  # the untied head, as llama.cpp's mixes keep it
    # llama.cpp computes with the blocks edgetok meant: its logits are those of the weights gguf-py
    # decodes from the file (edgetok's read-back), far closer than to the float model's
    src, back = load_source(str(wide_folder)), load_source(str(out))
    assert back.info["tensor_types"][kind.upper()] > 0
    tokens = list(range(3, 67))
    got = llamacpp_logits(out, tokens)
    decoded = model_logits(LlamaModel.from_state_dict(back.config, back.weights), tokens)
    float_ = model_logits(LlamaModel.from_state_dict(src.config, src.weights), tokens)
    assert (got - decoded).abs().max().item() < 0.15  # llama.cpp rounds activations to 8 bits for these dots
    assert compare(decoded, got, tokens).kl_mean < compare(float_, got, tokens).kl_mean / 5
    assert report["parity"]["kl_mean"] < 0.05
    assert len(edgetok.load(str(out), backend="llamacpp").generate("The quick", max_new_tokens=3).tokens) == 3


def test_tensor_type_overrides_by_llamacpp_name(wide_folder, tmp_path):
    out = tmp_path / "mixed.gguf"
    r = run_cli("export", wide_folder, "--format", "gguf", "--quant", "q4_k", "--no-verify", "-o", out,
                "--tensor-type", r"blk\.0\.attn_v=q8_0", "--tensor-type", "attn_v|ffn_up=q6_k")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "mixed.gguf.json").read_text())
    types = {t["tensor"]: t["type"] for t in report["type_plan"]}
    assert types["blk.0.attn_v.weight"] == "q8_0"  # the first pattern that finds a tensor decides
    assert types["blk.1.attn_v.weight"] == types["blk.0.ffn_up.weight"] == "q6_k"
    assert types["blk.0.attn_q.weight"] == "q4_k"
    assert report["tensor_types"]["model.layers.0.self_attn.v_proj.weight"] == "q8_0"
    assert "by --tensor-type: 1 tensors at q8_0, 3 tensors at q6_k" in r.output


@pytest.mark.parametrize("spec,words", [
    ("attn_x=q8_0", "matches no weight matrix of this model"),
    ("attn_norm=q8_0", "matches no weight matrix"),  # a norm is no matrix: its type is f32
    ("attn_v", "REGEX=TYPE"),
    ("attn_v=q3_k", "unknown type"),
    ("attn_v(=q8_0", "not a regular expression"),
])
def test_tensor_type_mistakes_are_one_sentence_and_write_nothing(wide_folder, tmp_path, spec, words):
    out = tmp_path / "m.gguf"
    r = run_cli("export", wide_folder, "--format", "gguf", "--quant", "q4_k", "-o", out, "--tensor-type", spec)
    assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    assert not list(tmp_path.iterdir())


def test_tensor_type_is_for_gguf(wide_folder, tmp_path):
    r = run_cli("export", wide_folder, "--format", "onnx", "-o", tmp_path / "o", "--tensor-type", "attn_v=q8_0")
    assert r.exit_code == 1 and "--tensor-type, --imatrix and --save-imatrix apply to --format gguf" in r.output


def test_q8_0_input_rounding_is_gguf_pys_q8_0():
    x = rows(8, 256, seed=3)
    q8 = gguf.GGMLQuantizationType.Q8_0
    expected = torch.from_numpy(dequantize(quantize(x.numpy(), q8), q8).reshape(x.shape))
    assert torch.equal(round_to_int8_blocks(x, 32, torch.float16), expected)
    coarse = round_to_int8_blocks(x, 256, torch.float32)  # q8_K's blocks: one scale for the outlier's whole row
    assert (coarse - x).abs().mean() > 1.5 * (expected - x).abs().mean()
    assert input_rounding("f32") is None and torch.equal(input_rounding("f16")(x), x.half().float())


@pytest.mark.parametrize("kind", ["q8_0", "q6_k"])
def test_the_allocators_model_of_a_file_has_llamacpps_kl(wide_folder, tmp_path, kind):
    """What the sensitivity measures for a file (its decoded weights, each matrix's input rounded
    to its type's 8-bit partner) is the KL llama.cpp's logits have against the float model; the
    weights alone miss what llama.cpp's input rounding adds (a third of it at q8_0, 8 % at q6_k)."""
    out = tmp_path / f"{kind}.gguf"
    r = run_cli("export", wide_folder, "--format", "gguf", "--quant", kind, "--no-verify", "-o", out)
    assert r.exit_code == 0, r.output
    src, back = load_source(str(wide_folder)), load_source(str(out))
    kinds = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(out).tensors}
    matrices = {hf: kinds[gg] for gg, hf in tensor_layout(back.config, back.weights).items() if back.weights[hf].dim() == 2}
    tokens = list(range(3, 131))
    rounded = Rounded(src, tokens, input_rounding)
    llamacpp = compare(rounded.reference, llamacpp_logits(out, tokens), tokens).kl_mean
    weights = {hf: back.weights[hf] for hf in matrices}
    modelled, weights_only = rounded.kl(Mix(weights, matrices)), rounded.kl(Mix(weights, {}))
    assert abs(modelled - llamacpp) < min(0.05 * llamacpp, abs(weights_only - llamacpp) / 4)
