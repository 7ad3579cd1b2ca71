"""edgetok's ONNX Runtime operators (kernels/q4_matmul.cpp) in real ONNX Runtime sessions: every
instruction set's loops against float64 arithmetic on the dequantized weights, the shapes a
decoder sends (one row, a few, a prefill), and bad graphs refused in a sentence."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgetok.errors import EdgetokError
from edgetok.exporters.onnx_rewrites import unpack_matmul_nbits
from edgetok.kernels import ort_ops

pytestmark = pytest.mark.skipif(ort_ops.library_path() is None, reason="the native kernels are not built")


def q4_weights(rng, n: int, k: int, block: int):
    """MatMulNBits-layout codes (N, blocks, block/2), scales (N, blocks), offsets (blocks, N)."""
    q = rng.integers(0, 16, (n, k // block, block), dtype=np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = (rng.random((n, k // block)) * 0.1 + 0.01).astype(np.float32)
    offsets = (rng.standard_normal((k // block, n)) * 0.2).astype(np.float32)
    return packed, scales, offsets


def dequantized(packed, scales, offsets) -> np.ndarray:
    """W (N, K) float64 = scale·q + offset (MatMulNBits' unpacking, its zero points all 0)."""
    n, blocks, _ = packed.shape
    zero = np.zeros((n, (blocks + 1) // 2), np.uint8)
    return unpack_matmul_nbits(packed, scales, zero, offsets.T, 4, blocks * packed.shape[2] * 2).astype(np.float64)


def q4_session(packed, scales, offsets, k: int, n: int, block: int, threads: int = 2, register: bool = True,
               a_width: int | None = -1):
    """A session of one MatMulQ4 node; a_width: A's declared last dimension (-1: K, None: unknown)."""
    inits = [helper.make_tensor(name, t, a.shape, a.tobytes(), raw=True)
             for name, t, a in [("B", TensorProto.UINT8, packed), ("S", TensorProto.FLOAT, scales), ("O", TensorProto.FLOAT, offsets)]]
    node = helper.make_node(ort_ops.MATMUL_Q4, ["A", "B", "S", "O"], ["Y"], domain=ort_ops.DOMAIN, K=k, N=n, block_size=block)
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, None, k if a_width == -1 else a_width])
    graph = helper.make_graph([node], "q4", [a],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ort_ops.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if register:
        ort_ops.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize(("k", "n", "block"), [(576, 1536, 32), (1536, 66, 64), (128, 7, 128)])
def test_matmul_q4_equals_its_dequantized_weights(monkeypatch, isa, k, n, block):
    """Y = A·Wᵀ with W = scale·q + offset, at one row (decode), a few (drafts, batches: the codes
    read once for all rows), and many (prefill: the dequantized-tile GEMM); odd column counts."""
    monkeypatch.setenv("EDGETOK_Q4_ISA", isa)  # read when a session registers the library
    rng = np.random.default_rng(k + n)
    packed, scales, offsets = q4_weights(rng, n, k, block)
    w = dequantized(packed, scales, offsets)
    session = q4_session(packed, scales, offsets, k, n, block)
    for rows in (1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 33):
        a = rng.standard_normal((2, rows, k)).astype(np.float32)
        (y,) = session.run(None, {"A": a})
        want = a.astype(np.float64) @ w.T
        assert y.shape == (2, rows, n)
        assert np.abs(y - want).max() <= 2e-6 * np.abs(want).max(), (rows, np.abs(y - want).max())


def test_matmul_q4_takes_an_empty_batch_and_one_thread():
    rng = np.random.default_rng(0)
    packed, scales, offsets = q4_weights(rng, 40, 64, 32)
    session = q4_session(packed, scales, offsets, 64, 40, 32, threads=1)
    assert session.run(None, {"A": np.zeros((1, 0, 64), np.float32)})[0].shape == (1, 0, 40)
    a = rng.standard_normal((1, 3, 64)).astype(np.float32)
    want = a @ dequantized(packed, scales, offsets).T
    np.testing.assert_allclose(session.run(None, {"A": a})[0], want, rtol=1e-5, atol=1e-5)


def test_matmul_q4_refuses_what_it_cannot_compute():
    rng = np.random.default_rng(1)
    packed, scales, offsets = q4_weights(rng, 8, 64, 16)
    with pytest.raises(Exception, match="multiple of 32"):  # onnxruntime's own error type
        q4_session(packed, scales, offsets, 64, 8, 16)
    packed, scales, offsets = q4_weights(rng, 8, 64, 32)
    session = q4_session(packed, scales, offsets, 64, 8, 32, a_width=None)  # a graph that does not declare it
    with pytest.raises(Exception, match="last dimension must be K"):
        session.run(None, {"A": np.zeros((1, 1, 32), np.float32)})


def test_a_session_without_the_library_is_one_sentence():
    rng = np.random.default_rng(2)
    packed, scales, offsets = q4_weights(rng, 8, 64, 32)
    with pytest.raises(Exception) as e:
        q4_session(packed, scales, offsets, 64, 8, 32, register=False)
    with pytest.raises(EdgetokError, match="compiled ONNX Runtime operators"):
        ort_ops.check_loadable(e.value)
