"""The mixed-bit attention op as an ONNX function of standard operators: what an NPU execution
provider gets (mixed_attention.md, "On a GPU or an NPU").

`edgetok.MixedAttention` (domain `edgetok`) takes a decode step's queries, the selected chunks
as codec.encode stores them — stacked by width, codes and fp16 scales, never float copies — and
the window, and returns what the native kernel returns: the output and each query's log-sum-exp.
Its body dequantizes with `BitShift` / `BitwiseAnd` / `Cast` / `Mul` / `Add`, then attends with
`MatMul` / `Softmax` / `MatMul`: every operator is in the default domain, so any runtime that runs
ONNX runs it (ONNX Runtime inlines the function), and one with a fused kernel for the op can
replace the body. The native CPU kernel (mixed_attention.py) stays what edgetok runs on a CPU.

Inputs, for n_w chunks at width w (n_w may be 0), S tokens a chunk, Hkv heads, D channels:
  q      (Hq, T, D) float32; query head h reads KV head h // (Hq / Hkv)
  k32/v32 (n, Hkv, S, D) float32;  k16/v16 (n, Hkv, S, D) bfloat16
  kc{w}  (n, Hkv, D, S·w/8) uint8, ks{w}/kz{w} (n, Hkv, D, 1) float16      keys: a scale per channel
  vc{w}  (n, Hkv, S, D·w/8) uint8, vs{w}/vz{w} (n, Hkv, S, D/vgroup) float16  values: per token group
  window_k/window_v (Hkv, W, D) float32, W ≥ T: its last T tokens are the queries' own (causal)
Outputs: out (Hq, T, D) float32; lse (Hq, T) float32 (natural log of the scaled scores' sum).
Codes are packed low bits first (kernels/quant.py); a value is code · scale + zero.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from edgetok.kernels.mixed_attention import value_group

DOMAIN, NAME = "edgetok", "MixedAttention"
OPSET = 18  # BitwiseAnd; ReduceLogSumExp with axes as an attribute
QUANTIZED = (8, 4, 2)
BF16 = ("k16", "v16")


def input_names() -> list[str]:
    names = ["q", "k32", "v32", "k16", "v16"]
    for w in QUANTIZED:
        names += [f"kc{w}", f"ks{w}", f"kz{w}", f"vc{w}", f"vs{w}", f"vz{w}"]
    return names + ["window_k", "window_v"]


class _Body:
    """The function's nodes, built in order with fresh value names."""

    def __init__(self, n_kv: int, n_heads: int, head_dim: int, chunk_size: int) -> None:
        self.hkv, self.group, self.d, self.size = n_kv, n_heads // n_kv, head_dim, chunk_size
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"t{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value: np.ndarray) -> str:
        return self.op("Constant", value=helper.make_tensor(f"c{self._n + 1}", helper.np_dtype_to_tensor_dtype(value.dtype),
                                                           value.shape, value.flatten().tolist()))

    def shape(self, *dims: int) -> str:
        return self.const(np.array(dims, np.int64))

    def tokens(self, x: str) -> str:
        """(n, Hkv, S, D) float → (Hkv, n·S, D). (No -1 in a shape here or below: n may be 0.)"""
        x = self.op("Transpose", x, perm=[1, 0, 2, 3])
        dims = self.op("Shape", x)
        count = self.op("ReduceProd", self.op("Slice", dims, self.shape(1), self.shape(3)), keepdims=1)  # (1,): n·S
        return self.op("Reshape", x, self.op("Concat", self.shape(self.hkv), count, self.shape(self.d), axis=0))

    def codes(self, packed: str, bits: int, last: int) -> str:
        """uint8 (n, Hkv, a, m) → float32 (n, Hkv, a, last = m · 8/bits), low bits first."""
        if bits == 8:
            return self.op("Cast", packed, to=TensorProto.FLOAT)
        mask = self.const(np.array((1 << bits) - 1, np.uint8))
        parts = []
        for shift in range(0, 8, bits):
            moved = self.op("BitShift", packed, self.const(np.array(shift, np.uint8)), direction="RIGHT")
            parts.append(self.op("Unsqueeze", self.op("BitwiseAnd", moved, mask), self.const(np.array([-1], np.int64))))
        both = self.op("Concat", *parts, axis=-1)  # (n, Hkv, a, m, 8/bits)
        return self.op("Cast", self.op("Reshape", both, self.shape(0, 0, 0, last)), to=TensorProto.FLOAT)

    def keys(self, w: int) -> str:
        """Width-w keys → (Hkv, n·S, D): codes (n, Hkv, D, S) · scale + zero per channel."""
        x = self.codes(f"kc{w}", w, self.size)
        x = self.op("Add", self.op("Mul", x, self.op("Cast", f"ks{w}", to=TensorProto.FLOAT)),
                    self.op("Cast", f"kz{w}", to=TensorProto.FLOAT))
        return self.tokens(self.op("Transpose", x, perm=[0, 1, 3, 2]))

    def values(self, w: int) -> str:
        """Width-w values → (Hkv, n·S, D): codes (n, Hkv, S, D) in groups of vgroup channels."""
        vg = value_group(self.d)
        x = self.op("Reshape", self.codes(f"vc{w}", w, self.d), self.shape(0, 0, 0, self.d // vg, vg))
        one = self.const(np.array([-1], np.int64))
        scale = self.op("Unsqueeze", self.op("Cast", f"vs{w}", to=TensorProto.FLOAT), one)
        zero = self.op("Unsqueeze", self.op("Cast", f"vz{w}", to=TensorProto.FLOAT), one)
        x = self.op("Add", self.op("Mul", x, scale), zero)
        return self.tokens(self.op("Reshape", x, self.shape(0, 0, 0, self.d)))

    def attention(self, keys: list[str], values: list[str]) -> None:
        """q over the keys and values (Hkv, N, D) in order, causal over the window's last T."""
        hkv, g, d = self.hkv, self.group, self.d
        k = self.op("Concat", *keys, "window_k", axis=1)
        v = self.op("Concat", *values, "window_v", axis=1)
        q = self.op("Reshape", "q", self.shape(hkv, g, -1, d))  # (Hkv, G, T, D)
        k_t = self.op("Unsqueeze", self.op("Transpose", k, perm=[0, 2, 1]), self.const(np.array([1], np.int64)))
        scores = self.op("Mul", self.op("MatMul", q, k_t), self.const(np.array(1.0 / math.sqrt(d), np.float32)))
        # (Hkv, G, T, N): key j is visible to query t when j ≤ N − T + t
        n = self.op("Gather", self.op("Shape", k), self.const(np.array(1, np.int64)), axis=0)
        t = self.op("Gather", self.op("Shape", "q"), self.const(np.array(1, np.int64)), axis=0)
        zero, one = self.const(np.array(0, np.int64)), self.const(np.array(1, np.int64))
        last = self.op("Add", self.op("Sub", n, t), self.op("Unsqueeze", self.op("Range", zero, t, one),
                                                            self.const(np.array([-1], np.int64))))  # (T, 1)
        hidden = self.op("Greater", self.op("Range", zero, n, one), last)  # (T, N)
        scores = self.op("Add", scores, self.op("Where", hidden, self.const(np.array(-np.inf, np.float32)),
                                                self.const(np.array(0.0, np.float32))))
        probs = self.op("Softmax", scores, axis=-1)
        out = self.op("MatMul", probs, self.op("Unsqueeze", v, self.const(np.array([1], np.int64))))  # (Hkv, G, T, D)
        self.nodes.append(helper.make_node("Reshape", [out, self.shape(hkv * g, -1, d)], ["out"]))
        lse = self.op("ReduceLogSumExp", scores, self.const(np.array([-1], np.int64)), keepdims=0)  # (Hkv, G, T)
        self.nodes.append(helper.make_node("Reshape", [lse, self.shape(hkv * g, -1)], ["lse"]))


def function(n_kv: int, n_heads: int, head_dim: int, chunk_size: int) -> onnx.FunctionProto:
    """edgetok.MixedAttention for a model's head counts and size and its quantized chunks' length
    (its body's reshapes name them)."""
    body = _Body(n_kv, n_heads, head_dim, chunk_size)
    keys = [body.tokens(body.op("Cast", "k32", to=TensorProto.FLOAT)), body.tokens(body.op("Cast", "k16", to=TensorProto.FLOAT))]
    values = [body.tokens(body.op("Cast", "v32", to=TensorProto.FLOAT)), body.tokens(body.op("Cast", "v16", to=TensorProto.FLOAT))]
    for w in QUANTIZED:
        keys.append(body.keys(w))
        values.append(body.values(w))
    body.attention(keys, values)
    return helper.make_function(DOMAIN, NAME, input_names(), ["out", "lse"], body.nodes,
                                [helper.make_opsetid("", OPSET)])


def model(n_kv: int, n_heads: int, head_dim: int, chunk_size: int) -> onnx.ModelProto:
    """A model of one MixedAttention node (its inputs and outputs the graph's): the op alone, as a
    runtime or an execution provider sees it."""
    d, s, vg = head_dim, chunk_size, value_group(head_dim)
    f, f16, u8 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.UINT8
    shapes = {"q": (f, [n_heads, "T", d]), "k32": (f, ["n32", n_kv, "S32", d]), "v32": (f, ["n32", n_kv, "S32", d]),
              "k16": (TensorProto.BFLOAT16, ["n16", n_kv, "S16", d]), "v16": (TensorProto.BFLOAT16, ["n16", n_kv, "S16", d]),
              "window_k": (f, [n_kv, "W", d]), "window_v": (f, [n_kv, "W", d])}
    for w in QUANTIZED:
        n = f"n{w}"
        shapes |= {f"kc{w}": (u8, [n, n_kv, d, s * w // 8]), f"ks{w}": (f16, [n, n_kv, d, 1]), f"kz{w}": (f16, [n, n_kv, d, 1]),
                   f"vc{w}": (u8, [n, n_kv, s, d * w // 8]), f"vs{w}": (f16, [n, n_kv, s, d // vg]),
                   f"vz{w}": (f16, [n, n_kv, s, d // vg])}
    inputs = [helper.make_tensor_value_info(name, *shapes[name]) for name in input_names()]
    outputs = [helper.make_tensor_value_info("out", f, [n_heads, "T", d]), helper.make_tensor_value_info("lse", f, [n_heads, "T"])]
    node = helper.make_node(NAME, input_names(), ["out", "lse"], domain=DOMAIN)
    graph = helper.make_graph([node], "mixed_attention", inputs, outputs)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                          functions=[function(n_kv, n_heads, head_dim, chunk_size)])
    onnx.checker.check_model(m, full_check=True)
    return m


def feeds(q: torch.Tensor, forms: list[tuple[dict, tuple]], window_k: torch.Tensor, window_v: torch.Tensor,
          chunk_size: int) -> dict[str, np.ndarray]:
    """The op's inputs for a decode step: q (Hq, T, D); the selected chunks' stored forms (codec.encode),
    any widths in any order (attention does not depend on the keys' order); the window (Hkv, W, D)."""
    hkv, _, d = window_k.shape
    vg = value_group(d)
    by_width: dict[int, list[dict]] = {}
    for tensors, meta in forms:
        by_width.setdefault(meta[0], []).append(tensors)

    def stack(width: int, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> np.ndarray:
        parts = [t[name] for t in by_width.get(width, [])]
        x = torch.stack(parts) if parts else torch.zeros((0, *shape), dtype=dtype)
        return x.view(torch.uint16).numpy() if dtype == torch.bfloat16 else x.numpy()  # (bf16: its bits; see run())

    s32 = by_width[32][0]["k"].shape[1] if 32 in by_width else chunk_size
    s16 = by_width[16][0]["k"].shape[1] if 16 in by_width else chunk_size
    out = {"q": q.float().contiguous().numpy(),
           "k32": stack(32, "k", torch.float32, (hkv, s32, d)), "v32": stack(32, "v", torch.float32, (hkv, s32, d)),
           "k16": stack(16, "k", torch.bfloat16, (hkv, s16, d)), "v16": stack(16, "v", torch.bfloat16, (hkv, s16, d)),
           "window_k": window_k.float().contiguous().numpy(), "window_v": window_v.float().contiguous().numpy()}
    s = chunk_size
    for w in QUANTIZED:
        out |= {f"kc{w}": stack(w, "kc", torch.uint8, (hkv, d, s * w // 8)), f"ks{w}": stack(w, "ks", torch.float16, (hkv, d, 1)),
                f"kz{w}": stack(w, "kz", torch.float16, (hkv, d, 1)), f"vc{w}": stack(w, "vc", torch.uint8, (hkv, s, d * w // 8)),
                f"vs{w}": stack(w, "vs", torch.float16, (hkv, s, d // vg)), f"vz{w}": stack(w, "vz", torch.float16, (hkv, s, d // vg))}
    return out


def run(session, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Run a model() session on feeds() → out, lse. (numpy has no bfloat16: k16/v16 travel as
    their uint16 bits and enter as bfloat16 tensors.)"""
    import onnxruntime as ort

    values = {name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x, TensorProto.BFLOAT16) if name in BF16
              else ort.OrtValue.ortvalue_from_numpy(x) for name, x in feeds.items()}
    out, lse = session.run_with_ort_values(["out", "lse"], values)
    return out.numpy(), lse.numpy()


class Runner:
    """The op's ONNX form run on one ONNX Runtime execution provider, for a cache that attends
    through it instead of the native kernel (KVConfig.op_provider): one session per shape of
    model, made when first needed."""

    def __init__(self, provider: str, threads: int = 1) -> None:
        self.provider, self.threads = provider, threads
        self._sessions: dict[tuple[int, int, int, int], object] = {}

    def attend(self, q: torch.Tensor, forms: list[tuple[dict, tuple]], window_k: torch.Tensor, window_v: torch.Tensor,
               chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q (Hq, T, D) over the stored forms' chunks (chunk_size tokens each) and the window
        (Hkv, W, D), its last T tokens q's own → out (Hq, T, D), lse (Hq, T), float32."""
        import onnxruntime as ort

        shape = (window_k.shape[0], q.shape[0], q.shape[2], chunk_size)
        session = self._sessions.get(shape)
        if session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            session = self._sessions[shape] = ort.InferenceSession(model(*shape).SerializeToString(), options,
                                                                   providers=[self.provider])
        out, lse = run(session, feeds(q, forms, window_k, window_v, chunk_size))
        return torch.from_numpy(out), torch.from_numpy(lse)
