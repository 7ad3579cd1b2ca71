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


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_matmul_q4_rows_are_each_rows_alone_bit_for_bit(monkeypatch, isa):
    """A row's result does not depend on the rows beside it, up to the GEMM's threshold (a draft of
    up to 31 tokens): each of m rows equals that row run alone — equal, not close (what keeps greedy
    speculation exact on the default engine)."""
    monkeypatch.setenv("EDGETOK_Q4_ISA", isa)
    rng = np.random.default_rng(7)
    for n in (1536, 1531):  # (an odd column count: a task's last column is summed alone)
        packed, scales, offsets = q4_weights(rng, n, 576, 32)
        session = q4_session(packed, scales, offsets, 576, n, 32)
        a = rng.standard_normal((1, 32, 576)).astype(np.float32)
        alone = np.concatenate([session.run(None, {"A": a[:, r : r + 1]})[0] for r in range(32)], axis=1)
        for rows in (2, 5, 6, 7, 9, 12, 13, 14, 16, 27, 32):
            np.testing.assert_array_equal(session.run(None, {"A": a[:, :rows]})[0], alone[:, :rows])


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


def attention_session(domain: str, heads: int, kv_heads: int, d: int, window: int, scale: float, positions: int = 4096):
    """One GroupQueryAttention node, packed q/k/v rotated inside: ONNX Runtime's (domain
    com.microsoft) or edgetok's (ai.edgetok: the same inputs without the two empty ones)."""
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [None, None, (heads + 2 * kv_heads) * d]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, [None, kv_heads, None, d]),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, [None, kv_heads, None, d]),
              helper.make_tensor_value_info("seqlens", TensorProto.INT32, [None, 1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("positions", TensorProto.INT64, [None, None])]
    angles = np.arange(positions)[:, None] / (10000 ** (np.arange(0, d, 2) / d))[None]
    tables = [helper.make_tensor(name, TensorProto.FLOAT, angles.shape, f(angles).astype(np.float32).tobytes(), raw=True)
              for name, f in (("cos", np.cos), ("sin", np.sin))]
    attrs = dict(num_heads=heads, kv_num_heads=kv_heads, scale=scale) | ({"local_window_size": window} if window else {})
    names = ["qkv", "past_key", "past_value", "seqlens", "total", "cos", "sin", "positions"]
    if domain == "com.microsoft":
        node = helper.make_node("GroupQueryAttention", [names[0], "", "", *names[1:]], ["out", "key", "value"], domain=domain,
                                do_rotary=1, rotary_interleaved=0, **attrs)
    else:
        node = helper.make_node(ort_ops.ATTENTION, names, ["out", "key", "value"], domain=ort_ops.DOMAIN, **attrs)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "key", "value")]
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs, tables),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
                                             helper.make_opsetid(ort_ops.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    ort_ops.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("heads", "kv_heads", "d", "window", "new", "pasts", "slots"), [
    (9, 3, 64, 0, 1, [2700], 2800),    # one decode step, in chunks over the threads
    (9, 3, 64, 0, 1, [700], 800),      # a 1K cache
    (9, 3, 64, 0, 1, [300], 400),      # a short cache: ONNX Runtime's kernel, called from inside
    (9, 3, 64, 0, 1, [2500], 2500),    # no room in the past: present is a larger new buffer
    (9, 3, 64, 0, 5, [2300], 2305),    # a few drafted tokens, causal among themselves
    (4, 1, 256, 0, 1, [2100, 2090], 2110),  # two sequences of different lengths (batched decode), Gemma's head size
    (9, 3, 64, 0, 1, [120, 37, 250, 5], 300),  # a batch of short caches (served clients): edgetok's loops too
    (8, 4, 32, 16, 1, [100, 30], 120),  # short batched caches in a sliding window
    (9, 3, 64, 0, 3, [0, 0], 0),       # the first tokens, no past
    (8, 4, 32, 16, 7, [2040], 2060),   # a sliding window
    (9, 3, 64, 0, 40, [100], 140),     # a prefill: ONNX Runtime's kernel, called from inside
])
def test_attention_equals_onnxruntimes(heads, kv_heads, d, window, new, pasts, slots):
    """edgetok's GroupQueryAttention = com.microsoft's on the same inputs: the output and the present
    K/V (rotated keys at their slots), unbound and bound in place to the past buffers."""
    rng = np.random.default_rng(heads + new + slots)
    scale = 1 / np.sqrt(d) if not window else 0.3
    theirs, ours = (attention_session(domain, heads, kv_heads, d, window, scale) for domain in ("com.microsoft", ort_ops.DOMAIN))
    b = len(pasts)
    feeds = {"qkv": rng.standard_normal((b, new, (heads + 2 * kv_heads) * d)).astype(np.float32),
             "past_key": rng.standard_normal((b, kv_heads, slots, d)).astype(np.float32),
             "past_value": rng.standard_normal((b, kv_heads, slots, d)).astype(np.float32),
             "seqlens": np.array([[p + new - 1] for p in pasts], np.int32), "total": np.array([max(pasts) + new], np.int32),
             "positions": np.array([[p + s for s in range(new)] for p in pasts], np.int64)}
    want, got = theirs.run(None, feeds), ours.run(None, feeds)
    assert [w.shape for w in want] == [g.shape for g in got]
    for row, past in enumerate(pasts):
        used = past + new  # (slots past a row's own length are nobody's: ONNX Runtime leaves them as they were)
        np.testing.assert_allclose(got[0][row], want[0][row], atol=2e-6)
        for i in (1, 2):
            np.testing.assert_allclose(got[i][row, :, :used], want[i][row, :, :used], atol=2e-6)
    if max(pasts) + new <= slots:  # in place: present bound to the past's own memory, as the backend binds it
        binding, past = ours.io_binding(), {k: v.copy() for k, v in feeds.items()}
        for name, array in past.items():
            binding.bind_cpu_input(name, array)
        out = np.empty_like(want[0])
        binding.bind_output("out", "cpu", 0, np.float32, out.shape, out.ctypes.data)
        for name, output in (("past_key", "key"), ("past_value", "value")):
            binding.bind_output(output, "cpu", 0, np.float32, past[name].shape, past[name].ctypes.data)
        ours.run_with_iobinding(binding)
        np.testing.assert_allclose(out, want[0], atol=2e-6)
        for row, p in enumerate(pasts):
            np.testing.assert_allclose(past["past_key"][row, :, :p + new], want[1][row, :, :p + new], atol=2e-6)


@pytest.mark.parametrize(("heads", "kv_heads", "d", "window", "new", "past"), [
    (9, 3, 64, 0, 9, 1020),     # SmolLM2: a draft of 8 after a 1K prompt, across a 512-slot chunk boundary
    (4, 1, 256, 0, 5, 2100),    # Gemma 3's head size
    (4, 1, 256, 512, 7, 2100),  # its sliding layers
    (9, 3, 36, 0, 3, 700),      # a head size that is no multiple of 8
])
def test_a_drafts_attention_is_the_one_token_steps_bit_for_bit(heads, kv_heads, d, window, new, past):
    """Verifying a draft of `new` tokens in one call gives each token the output a decode step of
    that token alone gives: equal, not close (what keeps greedy speculation exact)."""
    rng = np.random.default_rng(new + past)
    session = attention_session(ort_ops.DOMAIN, heads, kv_heads, d, window, 1 / np.sqrt(d))
    qkv = rng.standard_normal((1, new, (heads + 2 * kv_heads) * d)).astype(np.float32)
    cache = {name: rng.standard_normal((1, kv_heads, past + new, d)).astype(np.float32) for name in ("past_key", "past_value")}

    def run(first: int, count: int, kv: dict) -> list[np.ndarray]:
        return session.run(None, {"qkv": qkv[:, first : first + count], **kv,
                                  "seqlens": np.array([[past + first + count - 1]], np.int32),
                                  "total": np.array([past + first + count], np.int32),
                                  "positions": np.arange(past + first, past + first + count)[None]})

    draft, key, value = run(0, new, cache)
    for s in range(new):  # each token alone, after the tokens before it (their K/V as the draft wrote them)
        alone = run(s, 1, {"past_key": key.copy(), "past_value": value.copy()})[0]
        np.testing.assert_array_equal(alone[0, 0], draft[0, s])


@pytest.mark.parametrize(("heads", "kv_heads", "d", "window", "past"), [
    (9, 3, 64, 0, 1020),   # SmolLM2: the tree's slots across a 512-slot chunk boundary
    (9, 3, 64, 0, 40),     # a short cache (a chain would run ONNX Runtime's kernel, which has no tree)
    (4, 1, 256, 0, 600),   # Gemma 3's head size
    (4, 1, 256, 512, 600),  # its sliding layers: each node's window counts back from its own position
    (8, 4, 32, 3, 1020),   # a window shorter than the tree is deep: ancestors fall out of it
])
def test_a_draft_trees_nodes_attend_as_their_branches_would(heads, kv_heads, d, window, past):
    """Under ort_ops.draft_tree, node i at position past + depth(i) attends to the past and its own
    ancestors (within its window): its output is the one it gets as the last token of its branch run
    as a chain (the branch's K/V at consecutive slots); the tree's K/V land at slots past … past + N − 1."""
    from edgetok.runtimes.speculation import DraftTree

    tree = DraftTree(tuple(range(12)), (-1, 0, 0, 1, 1, 2, 3, 3, 4, 5, 7, 10))  # depths up to 5, three-way splits
    n, rng = len(tree.tokens), np.random.default_rng(past)
    session = attention_session(ort_ops.DOMAIN, heads, kv_heads, d, window, 1 / np.sqrt(d))
    qkv = rng.standard_normal((1, n, (heads + 2 * kv_heads) * d)).astype(np.float32)
    cache = {name: rng.standard_normal((1, kv_heads, past + n, d)).astype(np.float32) for name in ("past_key", "past_value")}

    def run(rows: list[int], positions: np.ndarray, kv: dict) -> list[np.ndarray]:
        return session.run(None, {"qkv": qkv[:, rows], **{k: v.copy() for k, v in kv.items()},
                                  "seqlens": np.array([[past + len(rows) - 1]], np.int32),
                                  "total": np.array([past + len(rows)], np.int32), "positions": positions[None]})

    with ort_ops.draft_tree(tree.visible):
        out, key, value = run(list(range(n)), past + tree.depths, cache)
    for node in range(n):
        branch = tree.branch(node)
        alone, chain_key, _ = run(branch, np.arange(past, past + len(branch)), cache)
        np.testing.assert_allclose(out[0, node], alone[0, -1], rtol=1e-5, atol=1e-6)
        # (a short chain runs ONNX Runtime's kernel, whose rotation rounds its own way)
        np.testing.assert_allclose(key[0, :, past + node], chain_key[0, :, past + len(branch) - 1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(key[0, :, :past], cache["past_key"][0, :, :past])
    with pytest.raises(ValueError, match="more than"):
        with ort_ops.draft_tree(np.eye(17, dtype=bool)):
            pass


def test_a_hooks_parallel_for_runs_every_item_outside_a_hook_too():
    """edgetok_hook_parallel_for lends the op's threads inside a hook; elsewhere it runs the items in turn."""
    import ctypes

    item = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)
    seen = []
    run = ctypes.CFUNCTYPE(ctypes.c_int, item, ctypes.c_size_t, ctypes.c_void_p)(ort_ops.hook_parallel_for())
    assert run(item(lambda _user, i: seen.append(i)), 5, None) == 0
    assert seen == [0, 1, 2, 3, 4]
