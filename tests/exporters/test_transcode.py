"""Transcoding (issue 20, item 4): an ONNX export of a Q4_1 GGUF carries its codes. q4_1's block
(32 values, fp16 scale d and minimum m: value = d·q + m) is MatMulNBits' 4-bit block with an exact
zero point, so round-to-nearest on the dequantized block finds d, m and the same codes: the
graph's weights are the GGUF's, up to fp16 storage of the block offset (no re-rounding)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli
from onnx import numpy_helper

from edgetok.exporters import onnx_rewrites as rw
from edgetok.exporters.gguf import writer_round_trip
from edgetok.exporters.gguf_codes import DECODERS, source_blocks, source_codes
from edgetok.exporters.quantize import QuantizedWeight
from edgetok.kernels import ort_ops
from edgetok.models.names import layer
from edgetok.models.sources import load_source


def test_q41_codes_carried_to_matmul_nbits(wide_folder, tmp_path):
    gguf_file = tmp_path / "m.q4_1.gguf"
    r = run_cli("export", wide_folder, "--format", "gguf", "--quant", "q4_1", "--no-verify", "-o", gguf_file)
    assert r.exit_code == 0, r.output
    out = tmp_path / "onnx"
    r = run_cli("export", gguf_file, "--format", "onnx", "--weights", "int4", "--activations", "float",
                "--eval-tokens", "64", "-o", out)
    assert r.exit_code == 0, r.output
    source = load_source(str(gguf_file))  # the GGUF's blocks, decoded: the export's reference
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in (f"{layer(0, 'mlp.down_proj')}.weight", f"{layer(1, 'self_attn.o_proj')}.weight"):
        w = source.weights[name].numpy()
        half = lambda n, name=name: inits[f"{name}.{n}.fp16"].astype(np.float32)  # noqa: E731  (to_fp16's storage)
        got = rw.unpack_matmul_nbits(inits[f"{name}.q"], half("scales"), inits[f"{name}.zero_points"],
                                     half("offsets").T, 4, w.shape[1])
        # the codes and scales are the GGUF's: only the offsets' fp16 storage differs from its m
        err = np.abs(got - w).max()
        assert err <= np.abs(w).max() * 1e-3, (name, err, np.abs(w).max())
    report = json.loads((out / "edgetok.json").read_text())
    assert report["parity"]["kl_mean"] < 1e-3


# -- --weights source: every carried GGUF type's codes, read from its blocks ----------------------------
CARRIED = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")


@pytest.fixture(scope="module")
def gguf_of(wide_folder, tmp_path_factory):
    """quant → a GGUF of the wide model written by edgetok's GGUF writer (built once per type)."""
    folder, made = tmp_path_factory.mktemp("carried"), {}

    def make(quant: str) -> Path:
        if quant not in made:
            made[quant] = folder / f"m.{quant}.gguf"
            r = run_cli("export", wide_folder, "--format", "gguf", "--quant", quant, "--no-verify", "-o", made[quant])
            assert r.exit_code == 0, r.output
        return made[quant]

    return make


@pytest.mark.parametrize("quant", CARRIED)
def test_source_codes_are_the_files_values(gguf_of, quant):
    """The codes decoded from each block type give gguf-py's dequantized values (the reference's
    weights) for every 2-D tensor, q/k rows unpermuted as the reader does."""
    path = gguf_of(quant)
    source = load_source(str(path))
    codes, types = source_codes(path, source.config)
    matrices = {n: w for n, w in source.weights.items() if w.dim() == 2}
    assert set(types) == set(matrices) and quant.upper() in set(types.values())
    assert set(codes) == {n for n in matrices if types[n] in {t.name for t in DECODERS}}  # (e.g. a fallback iq4_nl)
    for name, qw in codes.items():
        w = matrices[name]
        err = (qw.dequantize() - w).abs().max().item()
        assert err <= 1e-6 * w.abs().max().item(), (name, types[name], err)


def test_widened_grid_keeps_values(gguf_of):
    """A 4-bit, 32-group part and an 8-bit, 16-group one stack on the wider grid unchanged."""
    path = gguf_of("q4_k")
    codes, _ = source_codes(path, load_source(str(path)).config)
    a = codes[f"{layer(0, 'self_attn.q_proj')}.weight"]
    b = QuantizedWeight(a.q.clone(), a.scale.repeat_interleave(2, 1), a.zero.repeat_interleave(2, 1), 8, 16)
    both = QuantizedWeight.cat_rows([a, b])
    assert (both.bits, both.group_size) == (8, 16)
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


@pytest.mark.parametrize("quant", ["q4_k", "q6_k"])
def test_weights_source_export_carries_codes(gguf_of, tmp_path, quant):
    """--weights source: the graph's MatMulNBits weights are the GGUF's values (up to the fp16
    storage of scales and offsets), the parity report is near-exact, and the report names each
    type's width; a type MatMulNBits has no grid for (the writer's iq4_nl fallback for the 320-wide
    down_proj rows) is rounded again to int8 and listed."""
    path = gguf_of(quant)
    out = tmp_path / "onnx"
    r = run_cli("export", path, "--format", "onnx", "--weights", "source", "--activations", "float",
                "--eval-tokens", "64", "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "edgetok.json").read_text())
    q = report["quantization"]
    source = load_source(str(path))
    _, types = source_codes(path, source.config)
    assert any(k.startswith(quant.upper()) for k in q["plan"]), q
    rounded = {n: t for n, t in types.items() if t not in {d.name for d in DECODERS}}
    assert {n: r["type"] for n, r in q["rounded_again"].items()} == rounded, q
    assert all(0 < r["relative_error"] < 0.02 for r in q["rounded_again"].values()), q  # int8 of 4-bit values
    assert report["parity"]["kl_mean"] < 1e-3, report["parity"]
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    name = f"{layer(1, 'self_attn.o_proj')}.weight"
    w = source.weights[name].numpy()
    half = lambda n: inits[f"{name}.{n}.fp16"].astype(np.float32) if f"{name}.{n}.fp16" in inits else None  # noqa: E731
    offsets = half("offsets")
    bits = 4 if quant == "q4_k" else 8
    got = rw.unpack_matmul_nbits(inits[f"{name}.q"], half("scales"), inits.get(f"{name}.zero_points"),
                                 None if offsets is None else offsets.T, bits, w.shape[1])
    assert np.abs(got - w).max() <= np.abs(w).max() * 2e-3, (types[name], np.abs(got - w).max())
    # float activations for the 4-bit matrices only, on edgetok's MatMulQ4 (ONNX Runtime's 8-bit float
    # kernel is ~15× slower): the 8-bit ones stay MatMulNBits with int8 activations
    levels = {(a["bits"], a["accuracy_level"]) for a in ({x.name: x.i for x in n.attribute} for n in model.graph.node
                                                         if n.op_type == "MatMulNBits")}
    assert levels == {(8, 4)}, levels
    assert any(n.op_type == ort_ops.MATMUL_Q4 for n in model.graph.node) == (quant == "q4_k")


def test_weights_source_needs_a_gguf(wide_folder, gguf_of, tmp_path):
    r = run_cli("export", wide_folder, "--format", "onnx", "--weights", "source", "-o", tmp_path / "a")
    assert r.exit_code != 0 and "not a GGUF file" in r.output and not (tmp_path / "a").exists()
    r = run_cli("export", gguf_of("q4_k"), "--format", "onnx", "--weights", "source", "--block-size", "64",
                "-o", tmp_path / "b")
    assert r.exit_code != 0 and "--weights source carries" in r.output and not (tmp_path / "b").exists()


def test_a_gguf_written_again_keeps_its_sources_blocks(llamacpp_q4_k_m, tmp_path):
    """GGUF to GGUF: a tensor the plan gives its source's type is written with the source's own
    blocks, byte for byte (q/k rows permuted back as they came), as llama.cpp's quantizer keeps a
    tensor already at the type asked; the report marks them. The source is llama.cpp's Q4_K_M, whose
    codes rounding their values again need not recover."""
    import gguf

    out = tmp_path / "again.gguf"
    r = run_cli("export", llamacpp_q4_k_m, "--format", "gguf", "--quant", "q4_k", "--eval-tokens", "64", "-o", out)
    assert r.exit_code == 0, r.output

    def matrices(path):
        return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors
                if len(t.shape) == 2}

    before, after = matrices(llamacpp_q4_k_m), matrices(out)
    same = {n for n in before if before[n][0] == after[n][0]}
    assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight"} <= same  # permuted rows, q4_k in both
    assert all(before[n][1] == after[n][1] for n in same)
    report = json.loads((tmp_path / "again.gguf.json").read_text())
    assert {t["tensor"] for t in report["type_plan"] if t["kept"]} == same
    assert report["parity"]["kl_mean"] < 0.05  # the q6_k tensors are rounded to q4_k


def test_the_allocator_sees_a_kept_tensor_as_the_sources_values(llamacpp_q4_k_m):
    """The source's blocks, HF-named with q/k rows unpermuted, decode to the weights edgetok reads;
    at its stored type the writer's round trip is those values exactly, at another it rounds."""
    source = load_source(str(llamacpp_q4_k_m))
    stored = source_blocks(llamacpp_q4_k_m, source.config)
    matrices = {n for n, w in source.weights.items() if w.dim() == 2}
    assert set(stored) == matrices and {b.kind for b in stored.values()} >= {"q4_k", "q6_k"}
    writes = writer_round_trip({}, stored)
    for name, blocks in stored.items():
        w = source.weights[name]
        assert torch.equal(blocks.dequantize(), w), name
        assert torch.equal(writes(name, w, blocks.kind), w), name
    name = next(n for n, b in stored.items() if b.kind == "q4_k")
    assert not torch.equal(writes(name, source.weights[name], "iq4_nl"), source.weights[name])
