"""The decoder as an ONNX graph with explicit KV, built op by op from the reference weights.

Inputs (B = batch, S = new tokens, P = past tokens; every axis dynamic):
    input_ids      int64 (B, S)
    position_ids   int64 (B, S)    explicit: gathered past chunks are not contiguous
    past_length    int64 (B,)      valid past slots per row, in every layer; slots from there on
                                   are ignored, so a runtime may pass buffers with spare capacity
                                   (layers may differ in P: a budgeted cache gives each its own)
    logits_to_keep int64 (1,)      logits for the last N positions only; 0 = every position
    past_key.i / past_value.i   float32 (B, Hkv, P, D), per layer, any P (0 included), keys after RoPE
Outputs:
    logits                     float32 (B, N or S, V)
    present_key.i / present_value.i   float32 (B, Hkv, S, D): the new tokens' K/V only (the
                                   runtime's cache owns the past; the graph never copies it)
    query.i                    float32 (B, Hq, S, D): queries after RoPE, for the next step's
                                   chunk selection

Attention scores past and new keys separately and joins only the scores, so the past K/V is
read once and never concatenated. Every op is in the default ONNX domain; each linear is a
MatMul with an initializer (K, N) that the weight rewrites (onnx_rewrites.py) replace. The LM head
is a Gemm with transB over the (V, hidden) matrix, which a tied embedding shares with its Gather.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgetok.errors import EdgetokError
from edgetok.models.config import ModelConfig
from edgetok.models.llama import rope_inv_freq

DEFAULT_OPSET = 21  # int4 and blocked DequantizeLinear
NEG_INF = -3.0e38  # masked scores; every row keeps at least its own token, so softmax stays finite


def io_names(num_layers: int) -> dict[str, list[str]]:
    past = [n for i in range(num_layers) for n in (f"past_key.{i}", f"past_value.{i}")]
    present = [n for i in range(num_layers) for n in (f"present_key.{i}", f"present_value.{i}")]
    queries = [f"query.{i}" for i in range(num_layers)]
    return {
        "inputs": ["input_ids", "position_ids", "past_length", "logits_to_keep", *past],
        "outputs": ["logits", *present, *queries],
    }


class GraphBuilder:
    """Nodes, initializers and constants with generated unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "", name: str | None = None, **attrs):
        names = outputs if isinstance(outputs, list) else [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name or self.fresh(op_type), domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def weight(self, name: str, array: np.ndarray) -> str:
        array = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # which makes 0-d arrays 1-d
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        return self.weight(self.fresh("const"), np.asarray(value, dtype=dtype))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


# Linears that read the same input run as one MatMul (fewer, larger kernels); their rows stack.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fused_parts(name: str) -> list[str] | None:
    """The HF weight names stacked in a fused initializer's rows ("...qkv_proj.weight"), else None."""
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            return [name.replace(fused, part) for part in parts]
    return None


def build_decoder(cfg: ModelConfig, weights: dict[str, torch.Tensor], opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The fp32 decoder graph of a Llama-family model (HF-named weights)."""
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_context:
        raise EdgetokError("ONNX export does not support sliding-window attention yet (Mistral-style models)")
    if opset < 18:
        raise EdgetokError(f"--opset {opset} is too old: the graph needs opset 18 or newer")
    g = GraphBuilder()
    H, Hkv, D, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    G = H // Hkv

    def tensor(name: str) -> np.ndarray:
        parts = fused_parts(name)
        return np.concatenate([_np(weights[p]) for p in parts]) if parts else _np(weights[name])

    def linear(x: str, name: str, bias: bool) -> str:
        w = g.weight(f"{name}.weight", tensor(f"{name}.weight").T)  # (K, N): MatMul's layout
        y = g.op("MatMul", x, w, name=f"{name}/MatMul")
        return g.op("Add", y, g.weight(f"{name}.bias", tensor(f"{name}.bias"))) if bias else y

    def rms_norm(x: str, name: str) -> str:
        # The pattern ONNX Runtime fuses into SimplifiedLayerNormalization.
        var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
        rstd = g.op("Sqrt", g.op("Add", var, g.const(cfg.rms_norm_eps, np.float32)))
        return g.op("Mul", g.op("Div", x, rstd), g.weight(f"{name}.weight", _np(weights[f"{name}.weight"])))

    # -- shapes and masks shared by all layers ------------------------------------------------------
    ids_shape = g.op("Shape", "input_ids")
    s_len = g.op("Slice", ids_shape, g.const([1]), g.const([2]))  # (1,) S
    zero_f, neg_f = g.const(0.0, np.float32), g.const(NEG_INF, np.float32)
    # past slots ≥ past_length are masked; one table for the longest past (a buffer's capacity may
    # exceed the context), sliced per layer
    p_lens = [g.op("Shape", f"past_key.{i}", start=2, end=3) for i in range(cfg.num_layers)]  # (1,) P per layer
    p_max = g.op("ReduceMax", g.op("Concat", *p_lens, axis=0), keepdims=0)
    slots = g.op("Range", g.const(0), p_max, g.const(1))
    valid = g.op("Less", g.op("Unsqueeze", slots, g.const([0])), g.op("Unsqueeze", "past_length", g.const([1])))
    bias_table = g.op("Unsqueeze", g.op("Where", valid, zero_f, neg_f), g.const([1, 2]))  # (B, 1, 1, max P)

    def past_mask(i: int) -> tuple[str, str]:
        """Layer i's additive mask over its past slots (B, 1, 1, P) and the split sizes (P, S)."""
        p_len = p_lens[i]
        return g.op("Slice", bias_table, g.const([0]), p_len, g.const([3])), g.op("Concat", p_len, s_len, axis=0)

    # causal among the new tokens: (G·S, S), rows g·S + s
    steps = g.op("Range", g.const(0), g.op("Squeeze", s_len, g.const([0])), g.const(1))
    causal = g.op("LessOrEqual", g.op("Unsqueeze", steps, g.const([0])), g.op("Unsqueeze", steps, g.const([1])))
    new_bias = g.op("Tile", g.op("Where", causal, zero_f, neg_f), g.const([G, 1]))

    # RoPE: cos/sin (B, S, 1, D) in HF's half-split layout
    inv_freq = rope_inv_freq(cfg)
    if "rope_freqs" in weights:  # llama.cpp's per-frequency divisors (Llama 3 GGUFs)
        inv_freq = inv_freq / weights["rope_freqs"].float()
    pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.const([-1]))
    freqs = g.op("Mul", pos, g.weight("rope.inv_freq", _np(inv_freq)))
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([2]))
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)

    def rope(x: str) -> str:
        """x (B, S, heads, D)."""
        x1, x2 = g.op("Split", x, g.const([D // 2, D // 2]), axis=-1, outputs=2)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    # -- the layers ---------------------------------------------------------------------------------
    embed = g.weight("model.embed_tokens.weight", _np(weights["model.embed_tokens.weight"]))
    x = g.op("Gather", embed, "input_ids", axis=0, name="embed_tokens/Gather")  # (B, S, hidden)
    scale = g.const(1.0 / np.sqrt(D), np.float32)
    for i in range(L):
        p = f"model.layers.{i}"
        h = rms_norm(x, f"{p}.input_layernorm")
        qkv = g.op("Reshape", linear(h, f"{p}.self_attn.qkv_proj", cfg.qkv_bias), g.const([0, 0, H + 2 * Hkv, D]))
        qk, v = g.op("Split", qkv, g.const([H + Hkv, Hkv]), axis=2, outputs=2)
        q, k = g.op("Split", rope(qk), g.const([H, Hkv]), axis=2, outputs=2)  # (B, S, heads, D)
        g.op("Transpose", q, perm=[0, 2, 1, 3], outputs=[f"query.{i}"])  # (B, H, S, D)
        k_new = g.op("Transpose", k, perm=[0, 2, 1, 3], outputs=[f"present_key.{i}"])
        v_new = g.op("Transpose", v, perm=[0, 2, 1, 3], outputs=[f"present_value.{i}"])
        # query head h reads KV head h // G: group the query heads by KV head, (B, Hkv, G·S, D)
        qg = g.op("Mul", g.op("Reshape", f"query.{i}", g.const([0, Hkv, -1, D])), scale)
        past_bias, split_sizes = past_mask(i)
        s_past = g.op("Add", g.op("MatMul", qg, g.op("Transpose", f"past_key.{i}", perm=[0, 1, 3, 2])), past_bias)
        s_new = g.op("Add", g.op("MatMul", qg, g.op("Transpose", k_new, perm=[0, 1, 3, 2])), new_bias)
        probs = g.op("Softmax", g.op("Concat", s_past, s_new, axis=-1), axis=-1)
        p_past, p_new = g.op("Split", probs, split_sizes, axis=-1, outputs=2)
        o = g.op("Add", g.op("MatMul", p_past, f"past_value.{i}"), g.op("MatMul", p_new, v_new))  # (B, Hkv, G·S, D)
        o = g.op("Reshape", g.op("Transpose", g.op("Reshape", o, g.const([0, H, -1, D])), perm=[0, 2, 1, 3]), g.const([0, 0, H * D]))
        x = g.op("Add", x, linear(o, f"{p}.self_attn.o_proj", cfg.o_bias))
        h = rms_norm(x, f"{p}.post_attention_layernorm")
        gate, up = g.op("Split", linear(h, f"{p}.mlp.gate_up_proj", cfg.mlp_bias), g.const([cfg.intermediate_size] * 2),
                        axis=-1, outputs=2)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # SiLU(gate) · up
        x = g.op("Add", x, linear(act, f"{p}.mlp.down_proj", cfg.mlp_bias))

    # -- the head: only the positions asked for ------------------------------------------------------
    keep = g.op("Neg", "logits_to_keep")
    x = g.op("Slice", x, keep, g.const([np.iinfo(np.int64).max]), g.const([1]))
    x = rms_norm(x, "model.norm")
    head = embed if cfg.tie_word_embeddings else g.weight("lm_head.weight", _np(weights["lm_head.weight"]))
    flat = g.op("Reshape", x, g.const([-1, cfg.hidden_size]))
    logits = g.op("Gemm", flat, head, transB=1, name="lm_head/Gemm")
    out_shape = g.op("Concat", g.op("Slice", g.op("Shape", x), g.const([0]), g.const([2])), g.const([cfg.vocab_size]), axis=0)
    g.op("Reshape", logits, out_shape, outputs=["logits"])

    return _model(g, cfg, opset)


def _model(g: GraphBuilder, cfg: ModelConfig, opset: int) -> onnx.ModelProto:
    H, Hkv, D, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"]),
        helper.make_tensor_value_info("past_length", i64, ["batch"]),
        helper.make_tensor_value_info("logits_to_keep", i64, [1]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "logits_sequence", cfg.vocab_size])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", f32, ["batch", Hkv, "past_sequence", D]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", f32, ["batch", Hkv, "sequence", D]))
    outputs += [helper.make_tensor_value_info(f"query.{i}", f32, ["batch", H, "sequence", D]) for i in range(L)]
    graph = helper.make_graph(g.nodes, "edgetok_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgetok")
    model.ir_version = min(model.ir_version, 10)  # what current onnxruntime releases read
    return model
