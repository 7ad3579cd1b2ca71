"""Lower-precision weights on the torch backend: int8 weight-only and bf16."""

from __future__ import annotations

import pytest
import torch

import edgetok
from edgetok.errors import EdgetokError
from edgetok.kernels.linear import Int8Linear, quantize_rows


def test_int8_rows_round_trip():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3, 64)[:, None]  # rows of very different ranges
    codes, scale = quantize_rows(w)
    assert codes.dtype == torch.int8
    err = (codes.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


def test_int8_linear_matches_float_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64)
    q = Int8Linear(lin.weight.data, lin.bias.data)
    x = torch.randn(5, 96)
    want, got = lin(x), q(x).float()
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_low_precision_model_follows_fp32(tiny_folder, weights):
    ref = edgetok.load(str(tiny_folder), backend="torch")
    low = edgetok.load(str(tiny_folder), backend="torch", weights=weights)
    a = ref.generate("The quick brown fox", max_new_tokens=8, ignore_eos=True)
    b = low.generate("The quick brown fox", max_new_tokens=8, ignore_eos=True)
    assert b.tokens[:2] == a.tokens[:2]  # a random model has near-ties later on
    if weights == "int8":
        layer = low.engine.backend.model.model.layers[0].mlp.gate_up_proj
        assert isinstance(layer, Int8Linear) and layer.codes.dtype == torch.int8


def test_concatenated_int8_layers_equal_the_parts():
    torch.manual_seed(1)
    parts = [Int8Linear(torch.randn(n, 32), torch.randn(n)) for n in (16, 8, 8)]
    fused = Int8Linear.concat(parts)
    x = torch.randn(3, 32)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], -1))


def test_weights_errors(tiny_folder):
    with pytest.raises(EdgetokError, match="unknown weights"):
        edgetok.load(str(tiny_folder), backend="torch", weights="int3")


@pytest.mark.slow
def test_smollm2_int8_answers():
    m = edgetok.load("smollm2", backend="torch", weights="int8")
    assert "Paris" in m.generate("What is the capital of France?", chat=True, max_new_tokens=16).text


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_low_precision_weights_with_the_tiered_cache(tiny_folder, tmp_path, weights):
    """The tiered cache answers attention in the model's dtype (bf16 once failed in o_proj)."""
    from edgetok.runtimes.kv import KVConfig

    for kv in (KVConfig(budget="50%"), KVConfig(budget="50%", device_mb=0.01, host_mb=0.01, disk_dir=tmp_path)):
        m = edgetok.load(str(tiny_folder), backend="torch", weights=weights, kv=kv)
        r = m.generate("The quick brown fox " * 40, max_new_tokens=6, ignore_eos=True)
        assert len(r.tokens) == 6 and r.stats.kv["decode_steps"] == 5
