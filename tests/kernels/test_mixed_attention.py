"""The mixed-bit attention op: the native kernel against the plain torch reference (codec.attend_reference).

Tolerance: |kernel − reference| ≤ 2e-5 · (1 + max |v|) elementwise. Both dequantize the same fp16
scales and zeros; they differ only in float32 summation order and the kernel's polynomial exp
(relative error ≈ 2e-7), far below what a wrong code, scale, stride or mask produces (≥ 1e-2).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetok.kernels import mixed_attention
from edgetok.runtimes.kv.codec import attend_reference, encode, kernel_row

ISAS = mixed_attention.isas()


def test_the_native_kernel_is_built_with_a_vector_path():
    """make install builds it; on x86-64 an AVX2 or AVX-512 path is chosen whenever the CPU has one."""
    assert mixed_attention.available()
    assert ISAS[-1] == "scalar"


def _length(draw, bits: int) -> int:
    """Odd lengths where the codec allows them: key codes fill whole bytes per channel."""
    step = {32: 1, 16: 1, 8: 1, 4: 2, 2: 4}[bits]
    return step * draw(st.integers(1, 300 // step))


@st.composite
def problems(draw):
    d = draw(st.sampled_from([64, 128, 256]))
    g = draw(st.sampled_from([1, 3, 8]))
    hkv = draw(st.integers(1, 3))
    t = draw(st.sampled_from([1, 1, 2, 5]))  # one decode token, or a verified draft
    widths = draw(st.lists(st.sampled_from([16, 8, 4, 32, 2]), max_size=6))  # empty and single-chunk too
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for bits in widths:
        s = _length(draw, bits)
        spread = draw(st.sampled_from([0.1, 1.0, 4.0]))  # peaked to flat attention
        chunks.append(encode(torch.randn(hkv, s, d, generator=gen) * spread, torch.randn(hkv, s, d, generator=gen), bits))
    w = t + draw(st.integers(0, 40))
    window_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    wk = torch.randn(hkv, w, d, generator=gen).to(window_dtype)
    wv = torch.randn(hkv, w, d, generator=gen).to(window_dtype)
    q = torch.randn(hkv * g, t, d, generator=gen)
    return q, chunks, wk, wv


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(ISAS or ["auto"]), st.sampled_from([1, 2, 3]))
def test_kernel_equals_the_reference(problem, isa, threads):
    q, chunks, wk, wv = problem
    table = np.array([kernel_row(*c) for c in chunks] + [mixed_attention.float_row(wk, wv, causal=True)])
    out, lse = mixed_attention.attend(q, table, wk.shape[0], threads=threads, isa=isa)
    ref = attend_reference(q, chunks, wk, wv)
    v_max = max([wv.float().abs().max().item()] + [c[0]["v"].float().abs().max().item() for c in chunks if "v" in c[0]]
                + [4.0 for c in chunks if "vc" in c[0]])  # randn values, quantized: |v| ≲ 4
    assert torch.isfinite(lse).all()
    assert (out - ref).abs().max().item() <= 2e-5 * (1 + v_max)


def test_log_sum_exp_combines_partial_results():
    """Two calls over halves of the chunks merge, by their log-sum-exps, into the call over all."""
    gen = torch.Generator().manual_seed(1)
    hkv, d = 2, 64
    chunks = [encode(torch.randn(hkv, 32, d, generator=gen), torch.randn(hkv, 32, d, generator=gen), b) for b in (4, 8, 16, 4)]
    q = torch.randn(hkv * 3, 1, d, generator=gen)
    rows = np.array([kernel_row(*c) for c in chunks])
    whole, lse = mixed_attention.attend(q, rows, hkv)
    (a, la), (b, lb) = mixed_attention.attend(q, rows[:2], hkv), mixed_attention.attend(q, rows[2:], hkv)
    total = torch.logaddexp(la, lb)
    merged = a * (la - total).exp()[..., None] + b * (lb - total).exp()[..., None]
    assert torch.allclose(merged, whole, atol=1e-5) and torch.allclose(total, lse, atol=1e-5)


def test_no_chunks_at_all_gives_zeros_and_minus_infinity():
    q = torch.randn(6, 1, 64)
    out, lse = mixed_attention.attend(q, np.zeros((0, len(mixed_attention.FIELDS)), np.int64), 2)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


def test_a_slab_selection_reads_the_slab_in_place():
    """Rows into a float slab (the resident storage) see the same tokens as copies of them."""
    gen = torch.Generator().manual_seed(2)
    slab_k, slab_v = (torch.randn(3, 256, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    starts = torch.tensor([0, 64, 160])
    q = torch.randn(9, 1, 64, generator=gen)
    rows = mixed_attention.slab_rows(slab_k, slab_v, starts, 32)
    forms = [({"k": slab_k[:, s : s + 32].contiguous(), "v": slab_v[:, s : s + 32].contiguous()}, (16,)) for s in starts.tolist()]
    empty = torch.zeros(3, 1, 64)  # a window of one token the query cannot see past: add it to both
    rows = np.concatenate([rows, [mixed_attention.float_row(empty, empty, causal=True)]])
    out, _ = mixed_attention.attend(q, rows, 3)
    assert (out - attend_reference(q, forms, empty, empty)).abs().max() <= 2e-5 * 5


@pytest.mark.parametrize("bad, message", [
    ({"bits": 5}, "bits must be"),
    ({"length": 3, "bits": 4}, "whole bytes"),
    ({"k_scale": 0}, "scales and zeros"),
])
def test_a_bad_table_row_is_refused_not_read(bad, message):
    k = torch.randn(1, 8, 64)
    tensors, meta = encode(k, k, 4)
    row = kernel_row(tensors, meta)
    for name, value in bad.items():
        row[mixed_attention.FIELDS.index(name)] = value
    with pytest.raises(ValueError, match=message):
        mixed_attention.attend(torch.randn(1, 1, 64), np.array([row]), 1)
