"""Kernels of the tiered cache: quantization round trips, chunk bounds, budget policy."""

from __future__ import annotations

import pytest
import torch

from edgetok.kernels import mixed_attention
from edgetok.kernels.quant import dequantize, dequantize_stack, quantize
from edgetok.kernels.selection import chunk_upper_bounds, chunk_upper_bounds_reference, key_abstracts
from edgetok.runtimes.kv.codec import ALIGN, Packed, decode_many, encode, kernel_row
from edgetok.runtimes.kv.policy import allocate, attention_profile, bits_by_importance, chunk_size_for


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_round_trip_error_is_within_half_a_step(bits):
    x = torch.randn(3, 64, 32) * torch.linspace(0.1, 5, 32)  # groups of very different ranges
    q = quantize(x, bits, group=32)
    err = (dequantize(q) - x).abs()
    half_step = q.scale.float() / 2  # (3, 64, 1): one group per row
    assert (err <= half_step + 2e-3 * x.abs().max()).all()  # fp16 scale/zero round-off aside
    assert q.codes.nbytes == x.numel() * bits // 8
    assert q.nbytes < x.nbytes * (bits + 1) / 32 + 1


def test_more_bits_less_error():
    x = torch.randn(2, 16, 64)
    errs = [(dequantize(quantize(x, b, 64)) - x).abs().mean().item() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_stack_equals_one_by_one(bits):
    qs = [quantize(torch.randn(3, 64, 16), bits, 16) for _ in range(5)]
    assert torch.equal(dequantize_stack(qs), torch.stack([dequantize(q) for q in qs]))


def test_codec_keys_per_channel_values_per_token():
    k = torch.randn(3, 32, 64)
    k[:, :, 5] *= 50  # an outlier channel: per-channel scales keep the others precise
    v = torch.randn(3, 32, 64)
    tensors, meta = encode(k, v, 4)
    assert tensors["ks"].shape == (3, 64, 1)  # one scale per (head, channel) over the chunk's tokens
    assert tensors["vs"].shape == (3, 32, 1)  # one scale per (head, token)
    (k2, v2), = decode_many([(tensors, meta)])
    others = [c for c in range(64) if c != 5]
    assert (k2 - k)[:, :, others].abs().mean() < 0.15
    for bits in (32, 16):
        t, m = encode(k, v, bits)
        (k3, v3), = decode_many([(t, m)])
        assert torch.allclose(k3, k, atol=0, rtol=0 if bits == 32 else 1e-2) and k3.dtype == torch.float32


def test_bound_matches_definition_and_bounds_every_key():
    torch.manual_seed(0)
    hkv, g, c, s, d = 3, 3, 10, 16, 64
    k = torch.randn(hkv, c, s, d)
    q = torch.randn(hkv * g, d)
    abstracts = key_abstracts(k)
    fast = chunk_upper_bounds(q, abstracts)
    ref = chunk_upper_bounds_reference(q, k.amin(2).transpose(0, 1), k.amax(2).transpose(0, 1))
    assert torch.allclose(fast, ref, atol=1e-4)
    actual = torch.einsum("hgd,hcsd->hcgs", q.view(hkv, g, d), k).amax(-1).amax(-1) / d**0.5  # (Hkv, C)
    assert (fast >= actual - 1e-4).all()


def test_allocate_respects_caps_and_total():
    budgets = allocate([1, 1, 4, 0.5], average=100, caps=[1000, 1000, 150, 1000])
    assert budgets[2] == 150
    assert abs(sum(budgets) - 400) < 1e-6
    assert abs(budgets[0] / budgets[3] - 2) < 1e-6


def test_attention_profile_tells_concentrated_from_diffuse():
    d, n = 16, 256
    keys = torch.randn(1, n, d)
    sharp_q = keys[:, 10:11].repeat(1, 8, 1) * 8  # every query matches token 10 strongly
    flat_q = torch.zeros(1, 8, d)  # uniform attention
    sharp, flat = attention_profile(sharp_q, keys), attention_profile(flat_q, keys)
    assert sharp.spread < 0.05 < 0.5 < flat.spread
    assert sharp.importance.argmax() == 10
    assert chunk_size_for(sharp.spread, (16, 32, 64)) == 16 and chunk_size_for(flat.spread, (16, 32, 64)) == 64


def test_bits_by_importance_quarters():
    bits = bits_by_importance(list(range(8)), "auto")
    assert sorted(bits) == [4, 4, 8, 8, 8, 8, 16, 16]
    assert bits[7] == 16 and bits[0] == 4
    assert bits_by_importance([1, 2], "8") == [8, 8]


def test_a_packed_forms_kernel_row_is_its_tensors_row():
    """kernel_row makes a stored form's row from the packed buffer's addresses alone: the same row
    as the tensors' own (each tensor aligned in the one buffer, views made on demand)."""
    k, v = torch.randn(3, 16, 64), torch.randn(3, 16, 64)
    for bits in (32, 16, 8, 4, 2):
        packed, meta = encode(k, v, bits)
        assert packed.buffer.is_contiguous() and packed.nbytes == packed.layout.size
        assert all(packed[name].data_ptr() % ALIGN == packed.buffer.data_ptr() % ALIGN for name in packed)
        if bits in (32, 16):
            want = mixed_attention.float_row(packed["k"], packed["v"])
        else:
            want = mixed_attention.quantized_row(bits, 16, *(packed[name] for name in ("kc", "ks", "kz", "vc", "vs", "vz")))
        assert kernel_row(packed, meta) == want
        assert packed.owned() is packed  # its own buffer: nothing to copy
        inside = Packed(torch.cat([packed.buffer, packed.buffer])[: packed.nbytes], packed.layout)
        assert inside.owned() is not inside and torch.equal(inside.owned().buffer, packed.buffer)
