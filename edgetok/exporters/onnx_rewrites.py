"""Weight rewrites of the decoder graph: small passes, each usable and testable alone.

The fp32 graph (onnx_graph.py) has three kinds of weight use:
- linears: MatMul(x, W) with W an initializer of shape (K, N);
- the LM head: Gemm(x, E, transB=1) with E (V, hidden);
- the embedding: Gather(E, input_ids) — the same E when the embeddings are tied.

Passes:
- `to_matmul_nbits`: linears and the head become ONNX Runtime's MatMulNBits (block-quantized,
  4 or 8 bits); the embedding Gather reads the head's packed initializer and dequantizes only the
  rows it gathers, so a tied embedding stays one int4 copy.
- `to_qdq`: weights become int4/int8 initializers behind standard DequantizeLinear (blocked or
  per-channel), the form NPU execution providers accept; only default-domain operators.
- `to_fp16`: float initializers stored in half precision, cast back to float32 on load (after
  `to_matmul_nbits`, that halves its scales and fractional zero points on disk).

A `Quantizer` maps (initializer name, W (N out, K in)) to a QuantizedWeight, so the method that
chose the codes (RTN, GPTQ, ...) is the caller's business.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgetok.exporters.quantize import QuantizedWeight
from edgetok.kernels import ort_ops

# (initializer name, W (N, K)) → its codes; to_matmul_nbits also takes None: the weight stays float
Quantizer = Callable[[str, torch.Tensor], QuantizedWeight | None]
MS_DOMAIN = "com.microsoft"


# -- graph plumbing ---------------------------------------------------------------------------------
class _Graph:
    """Initializers by name and unique names for new nodes/tensors, over a ModelProto in place."""

    def __init__(self, model: onnx.ModelProto, pass_name: str) -> None:
        self.model, self.graph, self.pass_name = model, model.graph, pass_name
        self.inits = {t.name: t for t in self.graph.initializer}
        self._n = 0
        self._pending: list[onnx.NodeProto] = []  # nodes made since the last collect()

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}/{self.pass_name}{self._n}"  # unique across passes too

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def add_init(self, name: str, array: np.ndarray) -> str:
        t = numpy_helper.from_array(array, name)
        self.graph.initializer.append(t)
        self.inits[name] = t
        return name

    def drop_init(self, name: str) -> None:
        self.graph.initializer.remove(self.inits.pop(name))

    def const(self, value, dtype=np.int64) -> str:
        return self.add_init(self.fresh("const"), np.asarray(value, dtype=dtype))

    def node(self, op_type: str, inputs: list[str], domain: str = "", outputs: list[str] | None = None, **attrs) -> str:
        outputs = outputs or [self.fresh(op_type)]
        self._pending.append(helper.make_node(op_type, inputs, outputs, name=self.fresh(op_type), domain=domain, **attrs))
        return outputs[0]

    def rebuild(self, replace: dict[int, list[onnx.NodeProto]]) -> None:
        """Replace node i by replace[i] (in order): keeps the graph topologically sorted."""
        nodes = list(self.graph.node)
        del self.graph.node[:]
        for i, n in enumerate(nodes):
            self.graph.node.extend(replace.get(i, [n]))

    def collect(self) -> list[onnx.NodeProto]:
        out, self._pending = self._pending, []
        return out

    def use_domain(self, domain: str) -> None:
        if not any(o.domain == domain for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(domain, 1))


def _exact_top(g: _Graph, x: str, logits: str, weights: tuple, k: int, out: str) -> None:
    """logits (N, V) of x (N, hidden) with their k highest recomputed in float from the same codes
    (weights: the packed initializers, as _gather_dequantized takes them) → out (N, V)."""
    top = g.fresh("top_values")
    idx = g.fresh("top_indices")
    g.node("TopK", [logits, g.const([k])], outputs=[top, idx], axis=-1)  # (N, k)
    rows = _gather_dequantized(g, idx, *weights, g.fresh("top_rows"))  # (N, k, hidden)
    exact = g.node("ReduceSum", [g.node("Mul", [rows, g.node("Unsqueeze", [x, g.const([1])])]), g.const([-1])], keepdims=0)
    g.node("ScatterElements", [logits, idx, exact], outputs=[out], axis=-1)


def _weight_uses(g: _Graph):
    """(index, node, kind, initializer) for each linear MatMul, the head Gemm and the embedding Gather."""
    for i, n in enumerate(g.graph.node):
        if n.op_type == "MatMul" and n.input[1] in g.inits and len(g.inits[n.input[1]].dims) == 2:
            yield i, n, "linear", n.input[1]
        elif n.op_type == "Gemm" and n.input[1] in g.inits:
            assert any(a.name == "transB" and a.i == 1 for a in n.attribute), "the head Gemm takes (V, hidden)"
            yield i, n, "head", n.input[1]
        elif n.op_type == "Gather" and n.input[0] in g.inits:
            yield i, n, "embedding", n.input[0]


def _nk(kind: str, array: np.ndarray) -> torch.Tensor:
    """A weight as (N out, K in): linears store W transposed (K, N)."""
    return torch.from_numpy(np.array(array.T if kind == "linear" else array, order="C"))  # a writable copy


# -- MatMulNBits --------------------------------------------------------------------------------------
def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (..., n) → bytes (..., n·bits/8), the first value in the low bits."""
    if bits == 8:
        return codes.astype(np.uint8)
    assert bits == 4 and codes.shape[-1] % 2 == 0
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def pack_matmul_nbits(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """QuantizedWeight (N, K) → MatMulNBits' B (N, blocks, blob), scales (N, blocks), packed integer
    zero points (None for symmetric weights: MatMulNBits' default is 2^(bits-1)), and block offsets
    (N, blocks) for fractional zero points, else None.

    A fractional zero point z splits as w = s·q + o with o = -s·z: MatMulNBits takes the codes with
    zero point 0 and the offsets add o·Σx per block (llama.cpp's q4_1 dot product does the same).
    ONNX Runtime's fast integer kernels take integer zero points only; fractional ones send it to
    a float path ~40× slower (measured on this CPU).
    """
    n, k = qw.shape
    blocks = k // qw.group_size
    b = _pack_bits(qw.q.numpy().reshape(n, blocks, qw.group_size), qw.bits)
    scales = qw.scale.numpy().astype(np.float32)
    if qw.integer_zero and qw.symmetric:
        return b, scales, None, None
    offsets = None
    zero = qw.zero.numpy()
    if not qw.integer_zero:
        offsets = -(scales * zero.astype(np.float32))
        zero = np.zeros((n, blocks), np.uint8)
    if qw.bits == 4:  # two per byte, each row padded to whole bytes
        zero = np.pad(zero, ((0, 0), (0, blocks % 2)), constant_values=8)
        zero = _pack_bits(zero, 4)
    return b, scales, zero, offsets


def unpack_matmul_nbits(b, scales, zero, offsets, bits: int, k: int) -> np.ndarray:
    """The inverse of pack_matmul_nbits, dequantized: (N, K) float32."""
    n, blocks, _ = b.shape
    q = np.stack([b & 15, b >> 4], -1).reshape(n, blocks, -1) if bits == 4 else b
    if zero is None:
        zero = np.full((n, blocks), 1 << (bits - 1), np.float32)
    elif bits == 4:
        zero = np.stack([zero & 15, zero >> 4], -1).reshape(n, -1)[:, :blocks]
    w = (q.astype(np.float32) - zero[..., None]) * scales[..., None]
    if offsets is not None:
        w = w + offsets[..., None]
    return w.reshape(n, k)


def _gather_dequantized(g: _Graph, ids: str, packed: str, scales: str, zero: str | None, offsets: str | None,
                        bits: int, out: str) -> str:
    """Rows of MatMulNBits' packed (V, blocks, blob) initializer: ids (B, S) → (B, S, hidden) float."""
    rows = g.node("Gather", [packed, ids], axis=0)  # (B, S, blocks, blob) uint8
    zp = g.const(1 << (bits - 1), np.float32) if zero is None else g.node("Gather", [zero, ids], axis=0)
    if bits == 4:
        def unpack(x: str, merged_shape: list[int]) -> str:
            """Two nibbles per byte, low first: a new last axis of 2, merged into the one before."""
            lo = g.node("BitwiseAnd", [x, g.const(15, np.uint8)])
            hi = g.node("BitShift", [x, g.const(4, np.uint8)], direction="RIGHT")
            pair = g.node("Concat", [g.node("Unsqueeze", [lo, g.const([-1])]), g.node("Unsqueeze", [hi, g.const([-1])])], axis=-1)
            return g.node("Reshape", [pair, g.const(merged_shape)])

        rows = unpack(rows, [0, 0, 0, -1])  # (B, S, blocks, block)
        if zero is not None:
            blocks = g.inits[packed].dims[1]
            zp = g.node("Slice", [unpack(zp, [0, 0, -1]), g.const([0]), g.const([blocks]), g.const([-1])])
    if zero is not None:
        zp = g.node("Unsqueeze", [g.node("Cast", [zp], to=TensorProto.FLOAT), g.const([-1])])
    sc = g.node("Unsqueeze", [g.node("Gather", [scales, ids], axis=0), g.const([-1])])
    deq = g.node("Mul", [g.node("Sub", [g.node("Cast", [rows], to=TensorProto.FLOAT), zp]), sc])
    if offsets is not None:  # stored (blocks, V) for the linears' MatMul: gather columns
        off = g.node("Transpose", [g.node("Gather", [offsets, ids], axis=1)], perm=[1, 2, 0])  # (B, S, blocks)
        deq = g.node("Add", [deq, g.node("Unsqueeze", [off, g.const([-1])])])
    return g.node("Reshape", [deq, g.const([0, 0, -1])], outputs=[out])


INT8_ACTIVATIONS, FLOAT_ACTIVATIONS = 4, 0  # MatMulNBits' accuracy_level


def to_matmul_nbits(model: onnx.ModelProto, quantizer: Quantizer, float_kinds: frozenset[str] = frozenset(),
                    exact_top: int = 0, float_max_bits: int = 8, edgetok_ops: bool = True) -> None:
    """Every linear, the head and the embedding as block-quantized weights, at the bit width the
    quantizer chose for each (4 or 8), in place.

    MatMulNBits' accuracy_level 4 lets ONNX Runtime quantize activations to int8 per block for its
    integer kernels (fast; it applies to integer zero points, which the exact minima's codes have:
    their fractions are the separate offsets). float_kinds: the weight uses ("linear": the decoder
    layers' linears, "head") that multiply float activations instead (level 0): slower, but int8
    activations are what flips the fp32 reference's near-ties (−6 points of top-1 on SmolLM2).
    exact_top k > 0: the head's k highest logits are computed again from float activations and
    the same codes (_exact_top): the near-ties at the top — the next token — come out as the
    reference's, while the head keeps its fast integer kernel (its float kernel is ~9× slower).
    float_max_bits: matrices of more bits take int8 activations even in float_kinds.
    The 4-bit linears in float_kinds become edgetok's MatMulQ4 (kernels/ort_ops.py) when their
    blocks suit it: the same codes, float32 arithmetic at about the int8 kernel's speed; with
    edgetok_ops False (a graph for runtimes without edgetok's library) they stay MatMulNBits.
    """
    g = _Graph(model, "nbits")
    g.use_domain(MS_DOMAIN)
    uses = list(_weight_uses(g))
    packed: dict[str, tuple] = {}  # float initializer → (B, scales, zero points, offsets (or None), K, bits)
    q4_offsets: dict[str, np.ndarray | str] = {}  # float initializer → MatMulQ4's (blocks, N) offsets

    def pack(name: str, kind: str) -> tuple | None:
        if name not in packed:
            w = _nk(kind, g.array(name))
            qw = quantizer(name, w)
            if qw is None:  # kept float (--weights auto chose it)
                packed[name] = None
                return None
            assert qw.bits in (4, 8), qw.bits
            b, scales, zero, offsets = pack_matmul_nbits(qw)
            if offsets is None and qw.bits == 4:  # integer zero points z (8 when symmetric) as offsets −scale·z
                z = qw.zero.numpy().astype(np.float32) if not qw.symmetric else np.float32(8)
                q4_offsets[name] = np.ascontiguousarray(-(scales * z).T)
            zero = None if zero is None else g.add_init(f"{name}.zero_points", zero)
            offsets = None if offsets is None else g.add_init(f"{name}.offsets", np.ascontiguousarray(offsets.T))
            packed[name] = (g.add_init(f"{name}.q", b), g.add_init(f"{name}.scales", scales), zero, offsets,
                            w.shape[1], qw.bits)
            if offsets is not None:
                q4_offsets[name] = offsets
        return packed[name]

    def offsets_q4(name: str) -> str:
        if isinstance(q4_offsets[name], np.ndarray):
            q4_offsets[name] = g.add_init(f"{name}.q4_offsets", q4_offsets[name])
        return q4_offsets[name]

    summers: dict[tuple[int, int], str] = {}

    def block_sums(k: int, block: int) -> str:
        """(K, K/block) ones where input k belongs to block j: x @ it sums each block of x (one
        node instead of a Reshape and a ReduceSum: at batch 1 a decoder's cost is per node)."""
        if (k, block) not in summers:
            ones = np.zeros((k, -(-k // block)), np.float32)
            ones[np.arange(k), np.arange(k) // block] = 1
            summers[(k, block)] = g.add_init(g.fresh(f"block_sums_{k}_{block}"), ones)
        return summers[(k, block)]

    replace: dict[int, list[onnx.NodeProto]] = {}
    order = sorted(uses, key=lambda u: u[2] == "embedding")  # the head first: the embedding reuses it
    for i, n, kind, name in order:
        if pack(name, kind) is None:
            continue
        b, scales, zero, offsets, k, bits = pack(name, kind)
        if kind == "embedding":
            _gather_dequantized(g, n.input[1], b, scales, zero, offsets, bits, n.output[0])
            replace[i] = g.collect()
            continue
        block = g.inits[b].dims[2] * 8 // bits
        x, y = n.input[0], n.output[0]
        rescore = exact_top > 0 and kind == "head" and kind not in float_kinds
        if edgetok_ops and kind in float_kinds and bits == 4 and block % ort_ops.Q4_BLOCK_MULTIPLE == 0 and not rescore:
            g.use_domain(ort_ops.DOMAIN)
            g.node(ort_ops.MATMUL_Q4, [x, b, scales, offsets_q4(name)], domain=ort_ops.DOMAIN, outputs=[y],
                   K=k, N=g.inits[b].dims[0], block_size=block)
            replace[i] = g.collect()
            continue
        inputs = [x, b, scales] + ([] if zero is None else [zero])
        mm = g.node("MatMulNBits", inputs, domain=MS_DOMAIN, outputs=[g.fresh(y)] if offsets or rescore else [y],
                    K=k, N=g.inits[b].dims[0], bits=bits, block_size=block,
                    accuracy_level=FLOAT_ACTIVATIONS if kind in float_kinds and bits <= float_max_bits else INT8_ACTIVATIONS)
        if offsets is not None:  # + Σx per block · offsets: the block sums are one small MatMul
            sums = g.node("MatMul", [x, block_sums(k, block)])  # (..., blocks)
            mm = g.node("Add", [mm, g.node("MatMul", [sums, offsets])], outputs=[g.fresh(y)] if rescore else [y])
        if rescore:
            _exact_top(g, x, mm, (b, scales, zero, offsets, bits), exact_top, y)
        replace[i] = g.collect()
    g.rebuild(replace)
    for name, pack_ in packed.items():
        if pack_ is not None:
            g.drop_init(name)


# -- QDQ: standard DequantizeLinear -------------------------------------------------------------------
def _signed(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Codes and zero points shifted into the signed range: (q - zero) is unchanged."""
    mid = 1 << (qw.bits - 1)
    return qw.q.numpy().astype(np.int16) - mid, qw.zero.numpy().astype(np.int16) - mid


def to_qdq(model: onnx.ModelProto, quantizer: Quantizer) -> None:
    """Every weight as int4/int8 + DequantizeLinear (blocked along K, or per output channel when
    the quantizer's group is the whole row); a tied embedding and head share one DequantizeLinear.
    Zero points must be integers here (DequantizeLinear's zero point has the weights' type)."""
    g = _Graph(model, "qdq")
    dequantized: dict[str, str] = {}  # float initializer → DequantizeLinear output

    def dq(name: str, kind: str) -> str:
        if name in dequantized:
            return dequantized[name]
        w = _nk(kind, g.array(name))
        qw = quantizer(name, w)
        assert qw.bits in (4, 8) and qw.integer_zero, (qw.bits, qw.zero.dtype)
        dtype = ml_dtypes.int4 if qw.bits == 4 else np.int8
        q, zero = _signed(qw)
        n, k = qw.shape
        per_channel = qw.group_size == k
        scale = qw.scale.numpy()
        if kind == "linear":  # stored (K, N): blocks run along axis 0, channels along axis 1
            q, zero, scale = q.T, zero.T, scale.T
            axis = 1 if per_channel else 0
        else:  # (V, hidden): blocks along axis 1, channels along axis 0
            axis = 0 if per_channel else 1
        if per_channel:
            zero, scale = zero.reshape(-1), scale.reshape(-1)
        attrs = {"axis": axis} if per_channel else {"axis": axis, "block_size": qw.group_size}
        inputs = [g.add_init(f"{name}.q", np.ascontiguousarray(q).astype(dtype)),
                  g.add_init(f"{name}.scale", np.ascontiguousarray(scale, dtype=np.float32)),
                  g.add_init(f"{name}.zero_point", np.ascontiguousarray(zero).astype(dtype))]
        dequantized[name] = g.node("DequantizeLinear", inputs, **attrs)
        return dequantized[name]

    replace: dict[int, list[onnx.NodeProto]] = {}
    for i, n, kind, name in _weight_uses(g):
        w = dq(name, kind)
        inputs = list(n.input)
        inputs[0 if kind == "embedding" else 1] = w
        new = onnx.NodeProto()
        new.CopyFrom(n)
        del new.input[:]
        new.input.extend(inputs)
        replace[i] = g.collect() + [new]
    g.rebuild(replace)
    for name in dequantized:
        g.drop_init(name)


# -- fp16 storage ----------------------------------------------------------------------------------------
def to_edgetok_attention(model: onnx.ModelProto) -> int:
    """ONNX Runtime's GroupQueryAttention in its packed, rotating form (every layer before a pruning
    point) → edgetok's (kernels/attention_op.cpp), in place: the same inputs, outputs and
    arithmetic; one decode step reads each KV head's cache once for its query group, in chunks over
    the threads (SmolLM2 at 4K: 1.28× the decode speed), and a prefill still runs ONNX Runtime's
    kernel, called from inside. Returns the number of layers rewritten."""
    g = _Graph(model, "attention")
    kept = ("num_heads", "kv_num_heads", "scale", "local_window_size")
    swapped = 0
    for n in g.graph.node:
        if n.op_type != "GroupQueryAttention" or n.domain != MS_DOMAIN or n.input[1] or len(n.input) != 10:
            continue  # the layers after a pruning point pass q, k, v apart (and a bias): ONNX Runtime's
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name in kept}
        n.CopyFrom(helper.make_node(ort_ops.ATTENTION, [n.input[0], *n.input[3:10]], list(n.output), name=n.name,
                                    domain=ort_ops.DOMAIN, **attrs))
        swapped += 1
    if swapped:
        g.use_domain(ort_ops.DOMAIN)
    return swapped


def to_fp16(model: onnx.ModelProto, min_elements: int = 1024) -> None:
    """Large float initializers stored as float16 and cast to float32 where used (ONNX Runtime folds
    the Cast at load: half the file, float32 compute). RoPE's cos/sin tables ("rope.*") are not
    weights and stay float32: in half precision a far position's angle is visibly off."""
    g = _Graph(model, "fp16")
    for t in list(g.graph.initializer):
        if t.data_type != TensorProto.FLOAT or int(np.prod(t.dims)) < min_elements or t.name.startswith("rope."):
            continue
        array = numpy_helper.to_array(t)
        if np.abs(array).max() >= np.finfo(np.float16).max:
            continue
        half = numpy_helper.from_array(array.astype(np.float16), f"{t.name}.fp16")
        g.graph.initializer.remove(t)
        g.graph.initializer.append(half)
        g.node("Cast", [half.name], outputs=[t.name], to=TensorProto.FLOAT)
    cast_nodes = g.collect()
    nodes = list(g.graph.node)
    del g.graph.node[:]
    g.graph.node.extend(cast_nodes + nodes)


def rtn_quantizer(bits: int, block_size: int | None, symmetric: bool = False, float_zero: bool = False) -> Quantizer:
    """Round-to-nearest with `block_size` inputs per scale (None: one scale per output channel)."""
    from edgetok.exporters.quantize import rtn

    return lambda name, w: rtn(w, bits, block_size or w.shape[1], symmetric, float_zero=float_zero)
