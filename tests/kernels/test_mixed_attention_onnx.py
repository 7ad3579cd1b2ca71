"""edgetok.MixedAttention, the op as an ONNX function of standard operators (the NPU form), run by
ONNX Runtime's CPU provider: the same output as the plain oracle (codec.attend_reference) and the
same log-sum-exp as the native kernel, over mixed widths, GQA groups, head sizes, empty and
single-chunk selections and odd windows."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetok.kernels import mixed_attention
from edgetok.kernels import mixed_attention_onnx as op
from edgetok.runtimes.kv.codec import attend_reference, encode, kernel_row


@st.composite
def problems(draw):
    d = draw(st.sampled_from([64, 128, 256]))
    group = draw(st.sampled_from([1, 3, 8]))
    hkv = draw(st.sampled_from([1, 2]))
    size = draw(st.sampled_from([16, 32]))
    widths = draw(st.lists(st.sampled_from([32, 16, 8, 4, 2]), max_size=6))
    t = draw(st.integers(1, 3))
    window = t + draw(st.integers(0, 19))
    seed = draw(st.integers(0, 2**16))
    return d, group, hkv, size, widths, t, window, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_the_standard_operator_form_equals_the_oracle_and_the_native_kernel(problem):
    d, group, hkv, size, widths, t, window, seed = problem
    gen = torch.Generator().manual_seed(seed)
    forms = [encode(torch.randn(hkv, size, d, generator=gen) * 2, torch.randn(hkv, size, d, generator=gen), w) for w in widths]
    wk, wv = torch.randn(hkv, window, d, generator=gen), torch.randn(hkv, window, d, generator=gen)
    q = torch.randn(hkv * group, t, d, generator=gen)

    session = ort.InferenceSession(op.model(hkv, hkv * group, d, size).SerializeToString(), providers=["CPUExecutionProvider"])
    out, lse = op.run(session, op.feeds(q, forms, wk, wv, size))

    want = attend_reference(q, forms, wk, wv).numpy()
    assert out.shape == want.shape == (hkv * group, t, d)
    assert np.abs(out - want).max() <= 2e-5 * (1 + np.abs(want).max())
    rows = np.array([kernel_row(*form) for form in forms] + [mixed_attention.float_row(wk, wv, causal=True)], np.int64)
    _, native_lse = mixed_attention.attend(q, rows, hkv)
    assert lse.shape == (hkv * group, t)
    np.testing.assert_allclose(lse, native_lse.numpy(), rtol=1e-5, atol=1e-4)


def test_its_body_is_standard_operators_only():
    """What an execution provider without edgetok's kernels can run: the function's body uses the
    default domain alone, and the model declares the op in the edgetok domain."""
    model = op.model(3, 9, 64, 16)
    (function,) = model.functions
    assert (function.domain, function.name) == (op.DOMAIN, op.NAME)
    assert {node.domain for node in function.node} == {""}
    assert {"BitShift", "BitwiseAnd", "MatMul", "Softmax"} <= {node.op_type for node in function.node}
    assert [(node.domain, node.op_type) for node in model.graph.node] == [(op.DOMAIN, op.NAME)]
    onnx.checker.check_model(model, full_check=True)


def test_a_chunk_of_another_length_than_the_model_declares_is_refused():
    model = op.model(1, 1, 64, 16)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    forms = [encode(torch.randn(1, 32, 64), torch.randn(1, 32, 64), 8)]
    with pytest.raises(Exception, match="(?i)shape|dimension"):
        op.run(session, op.feeds(torch.randn(1, 1, 64), forms, torch.randn(1, 4, 64), torch.randn(1, 4, 64), 16))
