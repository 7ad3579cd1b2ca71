"""llama.cpp's importance matrix (exporters/imatrix.py): edgetok writes what it calibrates in both of
llama.cpp's layouts, reads them back as written, weights its rounding by one (--imatrix), and
llama.cpp's own quantizer takes the file edgetok wrote."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import run_cli
from gguf.quants import dequantize

import edgetok
from edgetok.errors import EdgetokError
from edgetok.exporters.imatrix import Imatrix, read_imatrix
from edgetok.exporters.llamacpp_quantize import quantize_with_llamacpp
from edgetok.models.sources import load_source


def example(seed: int = 0) -> Imatrix:
    g = np.random.default_rng(seed)
    names = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.attn_output.weight"]
    # sums as float32 holds them: the GGUF layout stores them as they are
    return Imatrix({n: g.uniform(0, 3, 256 if "down" not in n else 320).astype(np.float32).astype(np.float64) for n in names},
                   {n: 512 * (i + 1) for i, n in enumerate(names)}, ["essays.txt"], 512)


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_written_imatrix_reads_back(tmp_path, suffix):
    m = example()
    path = tmp_path / f"imatrix{suffix}"
    m.write(path)
    back = read_imatrix(path)
    assert set(back.sums) == set(m.sums) and back.datasets == ["essays.txt"]
    for name in m.sums:  # the values a quantizer uses (Σx² / count; legacy: float32 mean squares · ncall)
        np.testing.assert_allclose(back.values(name).numpy(), m.values(name).numpy(), rtol=1e-6)
    if suffix == ".gguf":  # the GGUF layout keeps sums and counts themselves: identical
        assert back.counts == m.counts
        for name in m.sums:
            np.testing.assert_array_equal(back.sums[name], m.sums[name])
            assert torch.equal(back.values(name), m.values(name))
        fields = gguf.GGUFReader(path).fields
        assert fields["general.type"].contents() == "imatrix" and fields["imatrix.chunk_size"].contents() == 512


def test_not_an_imatrix_is_one_sentence(tmp_path):
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x02\x00\x00\x00garbage")
    with pytest.raises(EdgetokError, match="is not an imatrix file"):
        read_imatrix(bad)


@pytest.fixture(scope="module")
def saved(wide_folder, tmp_path_factory):
    """A q4_k export of the wide model that also saves its calibrated imatrix (both layouts)."""
    folder = tmp_path_factory.mktemp("imatrix")
    for suffix in (".gguf", ".dat"):
        r = run_cli("export", wide_folder, "--format", "gguf", "--quant", "f32", "--no-verify", "--calib-tokens", "1024",
                    "--save-imatrix", folder / f"imatrix{suffix}", "-o", folder / f"f32{suffix}.gguf")
        assert r.exit_code == 0, r.output
    return folder


def test_saved_imatrix_is_the_linears_input_statistics(saved):
    m = read_imatrix(saved / "imatrix.gguf")
    legacy = read_imatrix(saved / "imatrix.dat")
    assert set(m.sums) == {f"blk.{i}.{t}.weight" for i in range(2)
                           for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert m.counts["blk.0.attn_q.weight"] == 1024 and m.chunk_size == 512
    for i in range(2):  # q, k and v read one input, gate and up another
        q = m.values(f"blk.{i}.attn_q.weight")
        assert torch.equal(q, m.values(f"blk.{i}.attn_v.weight")) and (q > 0).all()
        assert torch.equal(m.values(f"blk.{i}.ffn_gate.weight"), m.values(f"blk.{i}.ffn_up.weight"))
        assert m.values(f"blk.{i}.ffn_down.weight").numel() == 320
    for name in m.sums:
        torch.testing.assert_close(legacy.values(name), m.values(name))


def test_llamacpp_quantizer_takes_edgetoks_imatrix(saved, tmp_path):
    """llama.cpp's Q4_K_M with edgetok's imatrix: it runs, and the importance changed its rounding."""
    m = read_imatrix(saved / "imatrix.gguf")
    plain = quantize_with_llamacpp(saved / "f32.gguf.gguf", tmp_path / "plain.gguf", "Q4_K_M")
    weighted = quantize_with_llamacpp(saved / "f32.gguf.gguf", tmp_path / "weighted.gguf", "Q4_K_M", m)
    a = {t.name: bytes(t.data) for t in gguf.GGUFReader(plain).tensors}
    b = {t.name: bytes(t.data) for t in gguf.GGUFReader(weighted).tensors}
    assert a["blk.0.attn_q.weight"] != b["blk.0.attn_q.weight"]
    assert a["blk.0.attn_norm.weight"] == b["blk.0.attn_norm.weight"]
    assert len(edgetok.load(str(weighted), backend="llamacpp").generate("The quick", max_new_tokens=3).tokens) == 3


def weighted_error(path, name: str, w: torch.Tensor, importance: torch.Tensor) -> float:
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    back = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(w.shape))
    return ((back - w) ** 2 * importance).sum().item()


@pytest.mark.parametrize("quant", ["q4_k", "iq4_nl"])
def test_imatrix_weights_edgetoks_rounding(wide_folder, saved, tmp_path, quant):
    """--imatrix: the written blocks' error, weighted by the importance, is lower than without it."""
    imatrix = saved / "imatrix.gguf"
    for name, extra in (("plain", ()), ("weighted", ("--imatrix", imatrix))):
        r = run_cli("export", wide_folder, "--format", "gguf", "--quant", quant, "--no-verify", *extra,
                    "-o", tmp_path / f"{name}.gguf")
        assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "weighted.gguf.json").read_text())
    assert report["imatrix"]["tensors_weighted"] == 14
    m, src = read_imatrix(imatrix), load_source(str(wide_folder))
    w = src.weights["model.layers.0.mlp.gate_proj.weight"]
    imp = m.values("blk.0.ffn_gate.weight")
    plain = weighted_error(tmp_path / "plain.gguf", "blk.0.ffn_gate.weight", w, imp)
    assert weighted_error(tmp_path / "weighted.gguf", "blk.0.ffn_gate.weight", w, imp) < plain


def test_imatrix_of_another_model_is_refused(wide_folder, tmp_path):
    other = tmp_path / "other.gguf"
    Imatrix({"blk.0.attn_q.weight": np.ones(100)}, {"blk.0.attn_q.weight": 10}).write(other)
    r = run_cli("export", wide_folder, "--format", "gguf", "--quant", "q4_k", "--no-verify", "--imatrix", other,
                "-o", tmp_path / "x.gguf")
    assert r.exit_code == 1 and "made for another model" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x.gguf").exists()
