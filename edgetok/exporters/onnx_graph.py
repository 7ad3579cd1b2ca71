"""The decoder as an ONNX graph with explicit KV, built op by op from the reference weights.

Inputs (B = batch, S = new tokens, P = past tokens, L = layers; every axis dynamic):
    input_ids      int64 (B, S)
    position_ids   int64 (B, S)    explicit: gathered past chunks are not contiguous
    past_length    int64 (B, L)    valid past slots per row and layer; slots from there on are
                                   ignored, so a runtime may pass buffers with spare capacity
                                   (layers may differ: a budgeted cache gives each its own view,
                                   a pruned prompt leaves later layers fewer tokens)
    logits_to_keep int64 (1,)      logits for the last N positions only; 0 = every position
    prune_keep     float64 (1,)    fraction of the new tokens the layers after the prune layer run
                                   on (1: all); see "Prompt pruning" below
    prune_forced   bool (B, S)     new tokens the later layers keep whatever their scores (what the
                                   window's rare words refer to: kernels/keep.py, computed from
                                   the ids before the run); all False but in a pruned prefill
    past_positions int64 (B, C)    the positions of the past slots of the sliding-window layers
                                   after the prune layer (C ≥ their past_length); only in a pruning
                                   graph of a model with such layers (Gemma 3), see below
    past_key.i / past_value.i   float32 (B, Hkv, P, D), per layer, any P (0 included), keys after RoPE
Outputs:
    logits                     float32 (B, N or S', V)
    present_key.i / present_value.i   float32 (B, Hkv, *, D), per attention kind (below)
    qkv.i                      float32 (B, S', (Hq + 2·Hkv)·D): the fused q/k/v projection,
                                   before RoPE; its queries, rotated by the runtime, choose the
                                   tiered cache's chunks for the next step
    kept                       int64 (B, S'): which of the S new tokens the later layers kept

Two kinds of attention, the same math:
- "gqa" (the default): ONNX Runtime's GroupQueryAttention on the packed q/k/v, rotating them itself
  at the explicit positions, and SkipSimplifiedLayerNormalization (com.microsoft), as
  onnxruntime-genai's graphs use. present_key.i is the past buffer with the new tokens written at
  slots past_length.. : bind present_key.i to the same memory as past_key.i and the new K/V land in
  the cache in place. A past buffer either holds exactly past_length tokens or has room for the new
  ones too (slots ≥ past_length + S). (At 1K tokens the packed form decodes ~10 % faster than
  RotaryEmbedding + Split + GroupQueryAttention on q, k, v, which the layers from the prune layer
  on keep: see attention_gqa.)
- "standard": default-domain operators only (what NPU execution providers take, with --qdq).
  present_key.i is the new tokens' K/V only; past and new keys are scored apart and only the scores
  are joined, so the past is read once and never concatenated.

Prompt pruning (after LeoAM's neighbour, "token pruning"): after layer `prune_layer`, the last
prompt tokens (the observation window) score every new token by the attention it receives, and
the sinks, the window and the best tokens — a prune_keep fraction — go on through the later layers
at their own positions (kernels/pruning.py, op for op). S' = the kept count in layers after the
prune layer (qkv.i, present of those layers, logits); with prune_keep = 1 or S = 1 every token
is kept, in order. The later layers' past_length must count only what they stored.

A sliding-window layer after the prune layer holds the kept tokens at their own positions, with
gaps, so its window counts positions, not cache slots: new token s sees slot j only if
position(s) − position(j) < window. GroupQueryAttention's local_window_size counts slots, a
superset of that (positions grow by at least one a slot), so those layers keep it and add an
attention_bias (B, 1, S', T) built from the slots' positions: past_positions for the past slots,
the kept tokens' positions for the new ones. Why a bias: GroupQueryAttention keeps its fused kernel
and its in-place cache writes, and the bias is one (S', T) table per run, shared by every such layer
(they all hold the same tokens: the kept ones, then every later one); its position_ids input only
rotates, and the "standard" attention's masked MatMul + Softmax materializes every head's scores.
After the prompt plus a window of decode steps, positions and slots mask alike again.

Each linear is a MatMul with an initializer (K, N) that the weight rewrites (onnx_rewrites.py)
replace. The LM head is a Gemm with transB over the (V, hidden) matrix, which a tied embedding
shares with its Gather.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgetok.exporters.options import ATTENTION, DEFAULT_OPSET, MIN_OPSET
from edgetok.models import names
from edgetok.models.config import ModelConfig
from edgetok.models.llama import local_inv_freq, rope_attention_factor, rope_inv_freq
from edgetok.models.manifest import PruneSpec
from edgetok.runtimes.prune import DEFAULT_AFTER_LAYER, PrunePlan

MS_DOMAIN = "com.microsoft"
NEG_INF = -3.0e38  # masked scores; every row keeps at least its own token, so softmax stays finite


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
        outs = outputs if isinstance(outputs, list) else [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name or self.fresh(op_type), domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def weight(self, name: str, array: np.ndarray) -> str:
        array = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # which makes 0-d arrays 1-d
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        return self.weight(self.fresh("const"), np.asarray(value, dtype=dtype))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def default_prune(cfg: ModelConfig) -> PruneSpec | None:
    """The pruning point of `edgetok export` (the runtime's defaults); None for 1-layer models."""
    if cfg.num_layers < 2:
        return None
    plan = PrunePlan(keep=1.0, after_layer=min(DEFAULT_AFTER_LAYER, cfg.num_layers - 2))
    return PruneSpec(plan.after_layer, plan.sinks, plan.window, plan.pool)


def graph_inv_freq(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """RoPE's inverse frequencies (D/2,) as the graph uses them; the runtime rotates the qkv.i
    queries with the same ones."""
    inv_freq = rope_inv_freq(cfg)
    if names.ROPE_FREQS in weights:  # llama.cpp's per-frequency divisors (Llama 3 GGUFs)
        inv_freq = inv_freq / weights[names.ROPE_FREQS].float()
    return inv_freq.float()


def build_decoder(cfg: ModelConfig, weights: dict[str, torch.Tensor], opset: int = DEFAULT_OPSET,
                  attention: str = "gqa", prune: PruneSpec | None = None) -> onnx.ModelProto:
    """The fp32 decoder graph of a Llama-family model (HF-named weights)."""
    windows = cfg.graph_windows
    assert opset >= MIN_OPSET and attention in ATTENTION, (opset, attention)  # OnnxOptions checks them
    assert prune is None or 0 <= prune.after_layer <= cfg.num_layers - 2, prune
    g = GraphBuilder()
    H, Hkv, D, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    G = H // Hkv
    gqa = attention == "gqa"
    positioned = [] if prune is None else prune.positioned_layers(windows)  # their windows count positions
    assert not positioned or (gqa and len({windows[i] for i in positioned}) == 1), "exporters/onnx.py refuses these"

    def tensor(name: str) -> np.ndarray:
        parts = names.fused_parts(name)
        return np.concatenate([_np(weights[p]) for p in parts]) if parts else _np(weights[name])

    def linear(x: str, name: str, bias: bool, out: str | None = None) -> str:
        w = g.weight(f"{name}.weight", tensor(f"{name}.weight").T)  # (K, N): MatMul's layout
        y = g.op("MatMul", x, w, name=f"{name}/MatMul", outputs=[out] if out and not bias else 1)
        return g.op("Add", y, g.weight(f"{name}.bias", tensor(f"{name}.bias")), outputs=[out] if out else 1) if bias else y

    def norm_weight(name: str, scale: float = 1.0) -> str:
        """The norm's multiplier: its weight, plus Gemma's offset; `scale` folded in."""
        w = (_np(weights[f"{name}.weight"]) + np.float32(cfg.norm_offset)) * np.float32(scale)
        return g.weight(f"{name}.weight", w)

    def rms_norm(x: str, name: str, scale: float = 1.0) -> str:
        # The pattern ONNX Runtime fuses into SimplifiedLayerNormalization.
        var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
        rstd = g.op("Sqrt", g.op("Add", var, g.const(cfg.rms_norm_eps, np.float32)))
        return g.op("Mul", g.op("Div", x, rstd), norm_weight(name, scale))

    def add_norm(x: str, delta: str, name: str) -> tuple[str, str]:
        """The residual x + delta, and its RMS norm (one fused kernel with gqa)."""
        if not gqa:
            x = g.op("Add", x, delta)
            return x, rms_norm(x, name)
        outs = [g.fresh("normed"), "", "", g.fresh("residual")]
        g.op("SkipSimplifiedLayerNormalization", delta, x, norm_weight(name),
             outputs=outs, domain=MS_DOMAIN, epsilon=cfg.rms_norm_eps)
        return outs[3], outs[0]

    def activation(gate: str) -> str:
        if cfg.hidden_act == "gelu_tanh":
            if opset >= 20:
                return g.op("Gelu", gate, approximate="tanh")
            # 0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³))), for opsets before Gelu
            cube = g.op("Mul", g.op("Mul", gate, gate), gate)
            inner = g.op("Mul", g.op("Add", gate, g.op("Mul", cube, g.const(0.044715, np.float32))),
                         g.const(np.sqrt(2 / np.pi), np.float32))
            return g.op("Mul", g.op("Mul", gate, g.const(0.5, np.float32)), g.op("Add", g.op("Tanh", inner), g.const(1.0, np.float32)))
        return g.op("Mul", gate, g.op("Sigmoid", gate))  # SiLU

    # -- what every layer needs about the past ------------------------------------------------------
    zero_f, neg_f = g.const(0.0, np.float32), g.const(NEG_INF, np.float32)
    if not gqa:
        # past slots ≥ past_length are masked: one table (B, L, longest P) (a buffer's capacity may
        # exceed the context), sliced per layer
        p_lens = [g.op("Shape", names.past("key", i), start=2, end=3) for i in range(L)]  # (1,) P per layer
        p_max = g.op("ReduceMax", g.op("Concat", *p_lens, axis=0), keepdims=0)
        slots = g.op("Range", g.const(0), p_max, g.const(1))
        valid = g.op("Less", slots, g.op("Unsqueeze", names.PAST_LENGTH, g.const([2])))  # (B, L, max P)
        bias_table = g.op("Where", valid, zero_f, neg_f)

    def past_mask(i: int) -> tuple[str, str]:
        """Layer i's additive mask over its past slots (B, 1, 1, P)."""
        row = g.op("Unsqueeze", g.op("Gather", bias_table, g.const(i), axis=1), g.const([1, 2]))
        return g.op("Slice", row, g.const([0]), p_lens[i], g.const([3]))

    # -- what every layer needs about the new tokens (all of them, or the kept ones) -----------------
    inv_freq = graph_inv_freq(cfg, weights)
    local_freq = local_inv_freq(cfg)
    rope_scale = rope_attention_factor(cfg)  # cos and sin times it (longrope's attention factor)
    if gqa:  # RotaryEmbedding reads cos/sin tables (max positions, D/2): one pair per RoPE base
        def rope_tables(freq: torch.Tensor, name: str, scale: float) -> tuple[str, str]:
            angles = torch.arange(cfg.max_context, dtype=torch.float32)[:, None] * freq.float()[None]
            return g.weight(f"{name}.cos", _np(angles.cos() * scale)), g.weight(f"{name}.sin", _np(angles.sin() * scale))

        tables = rope_tables(inv_freq, "rope", rope_scale)
        local_tables = tables if local_freq is None else rope_tables(local_freq, "rope_local", 1.0)
        rope_of = [local_tables if local_freq is not None and cfg.window(i) is not None else tables for i in range(L)]

    def per_layer(x: str, axis: int) -> list[str]:
        """x split along `axis` into its L layers' pieces."""
        pieces = [g.fresh("layer") for _ in range(L)]
        g.op("Split", x, axis=axis, num_outputs=L, outputs=pieces)
        return pieces

    def tokens(positions: str, n: str) -> dict:
        """positions (B, n) of the n (1,) tokens a layer runs on → rope inputs and masks."""
        t = {"positions": positions, "n": n}
        if gqa:
            # GroupQueryAttention's lengths: past + new − 1 per row and layer, their max + 1 per layer
            seqlens = g.op("Cast", g.op("Sub", g.op("Add", names.PAST_LENGTH, n), g.const(1)), to=TensorProto.INT32)
            totals = g.op("Add", g.op("ReduceMax", seqlens, g.const([0]), keepdims=0), g.const(1, np.int32))  # (L,)
            # one (B, 1) and one (1,) per layer, from a Split each (GroupQueryAttention takes those
            # shapes too): two nodes, not two per layer
            t["seqlens"], t["totals"] = per_layer(seqlens, 1), per_layer(totals, 0)
            return t
        pos = g.op("Unsqueeze", g.op("Cast", positions, to=TensorProto.FLOAT), g.const([-1]))
        for key, freq, scale in (("", inv_freq, rope_scale), ("local.", local_freq, 1.0)):
            if freq is None:
                continue
            freqs = g.op("Mul", pos, g.weight(g.fresh("rope.inv_freq"), _np(freq)))
            emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([2]))
            cos, sin = g.op("Cos", emb), g.op("Sin", emb)  # (B, n, 1, D): HF's half-split layout
            if scale != 1.0:
                scale_f = g.const(scale, np.float32)
                cos, sin = g.op("Mul", cos, scale_f), g.op("Mul", sin, scale_f)
            t[f"{key}cos"], t[f"{key}sin"] = cos, sin
        # causal among the new tokens: (G·n, n), rows g·n + s; within each window too
        steps = t["steps"] = g.op("Range", g.const(0), g.op("Squeeze", n, g.const([0])), g.const(1))
        causal = g.op("LessOrEqual", g.op("Unsqueeze", steps, g.const([0])), g.op("Unsqueeze", steps, g.const([1])))
        t["new_bias"] = g.op("Tile", g.op("Where", causal, zero_f, neg_f), g.const([G, 1]))
        for w in sorted({w for w in windows if w is not None}):
            near = g.op("Less", g.op("Sub", g.op("Unsqueeze", steps, g.const([1])), g.op("Unsqueeze", steps, g.const([0]))), g.const(w))
            t[f"new_bias.{w}"] = g.op("Tile", g.op("Where", g.op("And", causal, near), zero_f, neg_f), g.const([G, 1]))
        return t

    def past_window_mask(i: int, t: dict[str, str]) -> str:
        """Layer i's additive mask (B, 1, G·n, P) hiding past slots outside each new token's window:
        slot j is position j of the layer's consecutive tokens, new token s is at past_length + s."""
        length = g.op("Unsqueeze", g.op("Gather", names.PAST_LENGTH, g.const(i), axis=1), g.const([1, 2]))  # (B, 1, 1)
        rows = g.op("Unsqueeze", t["steps"], g.const([0, 2]))  # (1, n, 1)
        slots = g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", p_lens[i], g.const([0])), g.const(1)), g.const([0, 1]))
        far = g.op("GreaterOrEqual", g.op("Sub", g.op("Add", length, rows), slots), g.const(windows[i]))  # (B, n, P)
        return g.op("Unsqueeze", g.op("Tile", g.op("Where", far, neg_f, zero_f), g.const([1, G, 1])), g.const([1]))

    def position_bias(t: dict[str, str]) -> str:
        """The additive mask (B, 1, n, T) of the sliding layers after the prune layer: slot j is
        hidden from new token s when it lies a window or more of positions before it. Columns:
        the first such layer's T slots (every such layer holds the same ones), past slots then the
        new tokens, each at its own position (past_positions, then t's positions)."""
        first, w = positioned[0], windows[positioned[0]]
        past_len = g.op("Gather", names.PAST_LENGTH, g.const([first]), axis=1)  # (B, 1)
        total = g.op("Cast", g.op("Squeeze", t["totals"][first], g.const([0])), to=TensorProto.INT64)  # () T
        width = g.op("Shape", names.PAST_POSITIONS, start=1, end=2)  # (1,) C
        slots = g.op("Unsqueeze", g.op("Range", g.const(0), total, g.const(1)), g.const([0]))  # (1, T)
        # slot j: past_positions[j] if j < past_length, else new token j − past_length (at C + that in
        # the concatenation); rows of a batch shorter than T point anywhere valid (their slots ≥ their
        # own total are GroupQueryAttention's to ignore)
        index = g.op("Where", g.op("Less", slots, past_len), slots, g.op("Add", g.op("Sub", slots, past_len), width))
        index = g.op("Min", index, g.op("Sub", g.op("Add", width, t["n"]), g.const(1)))  # (B, T)
        keys = g.op("GatherElements", g.op("Concat", names.PAST_POSITIONS, t["positions"], axis=1), index, axis=1)
        back = g.op("Sub", g.op("Unsqueeze", t["positions"], g.const([2])), g.op("Unsqueeze", keys, g.const([1])))  # (B, n, T)
        return g.op("Unsqueeze", g.op("Where", g.op("Less", back, g.const(w)), zero_f, neg_f), g.const([1]))

    def rope(x: str, t: dict[str, str], local: bool = False) -> str:
        """x (B, S, heads, D); local: the sliding layers' own RoPE (Gemma 3)."""
        key = "local." if local else ""
        x1, x2 = g.op("Split", x, g.const([D // 2, D // 2]), axis=-1, outputs=2)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, t[f"{key}cos"]), g.op("Mul", rotated, t[f"{key}sin"]))

    scale = 1.0 / float(np.sqrt(D))
    attention_scale = cfg.attention_scale  # Gemma's query_pre_attn_scalar, else 1/sqrt(D)

    def project(i: int, h: str) -> str:
        """Layer i's packed q/k/v (B, S, (H + 2·Hkv)·D) before RoPE, its query and key heads
        RMS-normed where the family norms them (QK-norm): the qkv.i output."""
        if not cfg.qk_norm:
            return linear(h, names.layer(i, names.QKV_FUSED), cfg.qkv_bias, out=names.qkv(i))
        qkv = linear(h, names.layer(i, names.QKV_FUSED), cfg.qkv_bias)
        q, k, v = g.op("Split", qkv, g.const([H * D, Hkv * D, Hkv * D]), axis=-1, outputs=3)

        def heads(x: str, n: int, norm: str) -> str:  # (B, S, n·D), normed over each head's D values
            per_head = g.op("Reshape", x, g.const([0, 0, n, D]))
            return g.op("Reshape", rms_norm(per_head, names.layer(i, norm)), g.const([0, 0, n * D]))

        return g.op("Concat", heads(q, H, names.Q_NORM), heads(k, Hkv, names.K_NORM), v, axis=-1, outputs=[names.qkv(i)])

    def attention_standard(i: int, h: str, t: dict[str, str]) -> tuple[str, str]:
        """Layer i's attention output (B, S, H·D) and its new keys (B, Hkv, S, D)."""
        qkv = project(i, h)
        qk, v = g.op("Split", g.op("Reshape", qkv, g.const([0, 0, H + 2 * Hkv, D])), g.const([H + Hkv, Hkv]), axis=2, outputs=2)
        local = local_freq is not None and cfg.window(i) is not None
        q, k = g.op("Split", rope(qk, t, local), g.const([H, Hkv]), axis=2, outputs=2)  # (B, S, heads, D)
        if prune is not None and i == prune.after_layer:
            g.op("Reshape", q, g.const([0, 0, H * D]), outputs=[f"rotated_query.{i}"])
        q = g.op("Transpose", q, perm=[0, 2, 1, 3])  # (B, H, S, D)
        k_new = g.op("Transpose", k, perm=[0, 2, 1, 3], outputs=[names.present("key", i)])
        v_new = g.op("Transpose", v, perm=[0, 2, 1, 3], outputs=[names.present("value", i)])
        # query head h reads KV head h // G: group the query heads by KV head, (B, Hkv, G·S, D)
        qg = g.op("Mul", g.op("Reshape", q, g.const([0, Hkv, -1, D])), g.const(attention_scale, np.float32))
        s_past = g.op("Add", g.op("MatMul", qg, g.op("Transpose", names.past("key", i), perm=[0, 1, 3, 2])), past_mask(i))
        if windows[i] is not None:
            s_past = g.op("Add", s_past, past_window_mask(i, t))
        new_bias = t["new_bias"] if windows[i] is None else t[f"new_bias.{windows[i]}"]
        s_new = g.op("Add", g.op("MatMul", qg, g.op("Transpose", k_new, perm=[0, 1, 3, 2])), new_bias)
        probs = g.op("Softmax", g.op("Concat", s_past, s_new, axis=-1), axis=-1)
        split = g.op("Concat", g.op("Shape", names.past("key", i), start=2, end=3), t["n"], axis=0)
        p_past, p_new = g.op("Split", probs, split, axis=-1, outputs=2)
        o = g.op("Add", g.op("MatMul", p_past, names.past("value", i)), g.op("MatMul", p_new, v_new))  # (B, Hkv, G·S, D)
        o = g.op("Reshape", g.op("Transpose", g.op("Reshape", o, g.const([0, H, -1, D])), perm=[0, 2, 1, 3]), g.const([0, 0, H * D]))
        return o, k_new

    def attention_gqa(i: int, h: str, t: dict[str, str]) -> tuple[str, str | None]:
        """Layer i's attention output and, at the prune layer, its rotated new keys (B, S, Hkv·D)."""
        qkv = project(i, h)  # (B, S, (H + 2·Hkv)·D)
        seqlens, total = t["seqlens"][i], t["totals"][i]  # (B, 1), (1,)
        outputs = [g.fresh("attention"), names.present("key", i), names.present("value", i)]
        attrs = dict(domain=MS_DOMAIN, num_heads=H, kv_num_heads=Hkv, scale=attention_scale)
        if windows[i] is not None:  # the last `window` keys, its own included (measured against torch: onnxruntime 1.32)
            attrs["local_window_size"] = windows[i]
        cos_cache, sin_cache = rope_of[i]
        if prune is None or i < prune.after_layer:  # packed, rotated inside at the explicit positions
            o = g.op("GroupQueryAttention", qkv, "", "", names.past("key", i), names.past("value", i), seqlens, total,
                     cos_cache, sin_cache, t["positions"], outputs=outputs, do_rotary=1, rotary_interleaved=0, **attrs)[0]
            return o, None
        # The prune layer's rotated queries and keys also score the tokens. The layers after it run
        # a pruned prompt's kept tokens, whose positions have gaps, over an empty past, and there
        # GroupQueryAttention rotates by 0, 1, 2, ... whatever position_ids say (onnxruntime 1.32):
        # they rotate first.
        qk, v = g.op("Split", qkv, g.const([(H + Hkv) * D, Hkv * D]), axis=-1, outputs=2)
        qk = g.op("RotaryEmbedding", qk, t["positions"], cos_cache, sin_cache, domain=MS_DOMAIN,
                  num_heads=H + Hkv, interleaved=0)
        q, k = g.op("Split", qk, g.const([H * D, Hkv * D]), axis=-1, outputs=[f"rotated_query.{i}", g.fresh("k")])
        bias = [t["position_bias"]] if i in positioned else []  # (causal by slot: positions grow with slots)
        o = g.op("GroupQueryAttention", q, k, v, names.past("key", i), names.past("value", i), seqlens, total,
                 "", "", "", *bias, outputs=outputs, do_rotary=0, **attrs)[0]
        return o, k

    def new_keys(k: str) -> str:
        """A layer's new keys as (B, Hkv, S, D), whichever attention made them."""
        return g.op("Transpose", g.op("Reshape", k, g.const([0, 0, Hkv, D])), perm=[0, 2, 1, 3]) if gqa else k

    def select(i: int, k: str, x: str, t: dict[str, str]) -> tuple[str, dict[str, str]]:
        """Prune after layer i: the kept rows of x (B, S, hidden) and their tokens' description."""
        assert prune is not None
        n = t["n"]
        w = g.op("Min", n, g.const([prune.window]))  # (1,) observation window
        q_w = g.op("Slice", f"rotated_query.{i}", g.op("Neg", w), g.const([np.iinfo(np.int64).max]), g.const([1]))  # (B, W, H·D)
        q_w = g.op("Transpose", g.op("Reshape", q_w, g.const([0, 0, H, D])), perm=[0, 2, 1, 3])  # (B, H, W, D)
        qg = g.op("Mul", g.op("Reshape", q_w, g.const([0, Hkv, -1, D])), g.const(scale, np.float32))
        scores = g.op("MatMul", qg, g.op("Transpose", new_keys(k), perm=[0, 1, 3, 2]))  # (B, Hkv, G·W, S)
        scores = g.op("Reshape", scores, g.const([0, H, -1, 0]))  # (B, H, W, S)
        # causal: window query j (new token S − W + j) sees tokens ≤ S − W + j
        n0 = g.op("Squeeze", n, g.const([0]))
        key_idx = g.op("Range", g.const(0), n0, g.const(1))  # (S,)
        q_idx = g.op("Add", g.op("Range", g.const(0), g.op("Squeeze", w, g.const([0])), g.const(1)), g.op("Sub", n, w))
        later = g.op("Greater", g.op("Unsqueeze", key_idx, g.const([0])), g.op("Unsqueeze", q_idx, g.const([1])))
        probs = g.op("Softmax", g.op("Add", scores, g.op("Where", later, neg_f, zero_f)), axis=-1)
        # received: mean over the window's queries, from the head that wants it most, pooled
        got = g.op("ReduceMax", g.op("ReduceMean", probs, g.const([2]), keepdims=0), g.const([1]), keepdims=0)  # (B, S)
        if prune.pool > 1:
            pooled = g.op("MaxPool", g.op("Unsqueeze", got, g.const([1])), kernel_shape=[prune.pool], strides=[1],
                          pads=[prune.pool // 2, prune.pool // 2])
            got = g.op("Squeeze", pooled, g.const([1]))
        # how many: ceil(keep · S), never fewer than the sinks and the window, never more than S
        n_f = g.op("Cast", n, to=TensorProto.DOUBLE)
        wanted = g.op("Cast", g.op("Ceil", g.op("Mul", names.PRUNE_KEEP, n_f)), to=TensorProto.INT64)
        count = g.op("Min", n, g.op("Max", wanted, g.op("Add", w, g.const([prune.sinks]))))
        # the sinks, the window and the forced tokens always: score them above everything
        sink = g.op("Less", key_idx, g.const(prune.sinks))
        in_window = g.op("GreaterOrEqual", key_idx, g.op("Sub", n0, g.op("Squeeze", w, g.const([0]))))
        forced_idx = g.op("Or", g.op("Or", sink, in_window), names.PRUNE_FORCED)  # (B, S)
        forced = g.op("Where", forced_idx, g.const(np.inf, np.float32), got)
        _, best = g.op("TopK", forced, count, axis=-1, largest=1, sorted=1, outputs=2)
        # in order
        kept, _ = g.op("TopK", best, count, axis=-1, largest=0, sorted=1, outputs=[names.KEPT, g.fresh("kept_order")])
        column = g.op("Unsqueeze", kept, g.const([-1]))
        rows = g.op("Expand", column, g.op("Concat", g.op("Shape", kept), g.const([cfg.hidden_size]), axis=0))
        x = g.op("GatherElements", x, rows, axis=1)
        positions = g.op("GatherElements", t["positions"], kept, axis=1)
        later = tokens(positions, count)
        if positioned:
            later["position_bias"] = position_bias(later)
        return x, later

    # -- the layers ---------------------------------------------------------------------------------
    embed = g.weight(names.EMBEDDING, _np(weights[names.EMBEDDING]))
    x = g.op("Gather", embed, names.INPUT_IDS, axis=0, name="embed_tokens/Gather")  # (B, S, hidden)
    if cfg.embed_scale:  # Gemma: × sqrt(hidden), in the activations' dtype
        x = g.op("Mul", x, g.const(np.float32(cfg.hidden_size**0.5), np.float32))
    t = tokens(names.POSITION_IDS, g.op("Shape", names.INPUT_IDS, start=1, end=2))
    pending = None  # the last sublayer's output, not yet added to the residual x
    for i in range(L):
        if pending is None:
            h = rms_norm(x, names.layer(i, names.INPUT_NORM))
        else:
            x, h = add_norm(x, pending, names.layer(i, names.INPUT_NORM))
        o, k = (attention_gqa if gqa else attention_standard)(i, h, t)
        o = linear(o, names.layer(i, names.O_PROJ), cfg.o_bias)
        if cfg.sandwich_norms:  # Gemma: attention's output normalized, then a norm before the MLP
            x, h = add_norm(x, rms_norm(o, names.layer(i, names.POST_ATTENTION_NORM)), names.layer(i, names.PRE_FFN_NORM))
        else:
            x, h = add_norm(x, o, names.layer(i, names.POST_ATTENTION_NORM))
        gate, up = g.op("Split", linear(h, names.layer(i, names.GATE_UP_FUSED), cfg.mlp_bias),
                        g.const([cfg.intermediate_size] * 2), axis=-1, outputs=2)
        act = g.op("Mul", activation(gate), up)  # SiLU(gate) · up, or GeGLU's gelu
        pending = linear(act, names.layer(i, names.DOWN_PROJ), cfg.mlp_bias)
        if cfg.sandwich_norms:
            pending = rms_norm(pending, names.layer(i, names.POST_FFN_NORM))
        if prune is not None and i == prune.after_layer:
            x, t = select(i, k, g.op("Add", x, pending), t)
            pending = None
    x = g.op("Add", x, pending)

    # -- the head: only the positions asked for ------------------------------------------------------
    keep = g.op("Neg", names.LOGITS_TO_KEEP)
    x = g.op("Slice", x, keep, g.const([np.iinfo(np.int64).max]), g.const([1]))
    x = rms_norm(x, names.FINAL_NORM)
    head = embed if cfg.tie_word_embeddings else g.weight(names.LM_HEAD, _np(weights[names.LM_HEAD]))
    flat = g.op("Reshape", x, g.const([-1, cfg.hidden_size]))
    logits = g.op("Gemm", flat, head, transB=1, name="lm_head/Gemm")
    out_shape = g.op("Concat", g.op("Slice", g.op("Shape", x), g.const([0]), g.const([2])), g.const([cfg.vocab_size]), axis=0)
    g.op("Reshape", logits, out_shape, outputs=[names.LOGITS])

    return _model(g, cfg, opset, gqa, prune, bool(positioned))


def _model(g: GraphBuilder, cfg: ModelConfig, opset: int, gqa: bool, prune: PruneSpec | None,
           positioned: bool) -> onnx.ModelProto:
    H, Hkv, D, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info(names.INPUT_IDS, i64, ["batch", "sequence"]),
        helper.make_tensor_value_info(names.POSITION_IDS, i64, ["batch", "sequence"]),
        helper.make_tensor_value_info(names.PAST_LENGTH, i64, ["batch", L]),
        helper.make_tensor_value_info(names.LOGITS_TO_KEEP, i64, [1]),
    ]
    if prune is not None:
        inputs.append(helper.make_tensor_value_info(names.PRUNE_KEEP, TensorProto.DOUBLE, [1]))
        inputs.append(helper.make_tensor_value_info(names.PRUNE_FORCED, TensorProto.BOOL, ["batch", "sequence"]))
    if positioned:
        inputs.append(helper.make_tensor_value_info(names.PAST_POSITIONS, i64, ["batch", "past_positions"]))
    outputs = [helper.make_tensor_value_info(names.LOGITS, f32, ["batch", "logits_sequence", cfg.vocab_size])]
    for i in range(L):
        new = "sequence" if prune is None or i <= prune.after_layer else "kept_sequence"
        for kind in names.KV_KINDS:
            inputs.append(helper.make_tensor_value_info(names.past(kind, i), f32, ["batch", Hkv, f"past_sequence.{i}", D]))
            present = f"present_sequence.{i}" if gqa else new
            outputs.append(helper.make_tensor_value_info(names.present(kind, i), f32, ["batch", Hkv, present, D]))
    for i in range(L):
        new = "sequence" if prune is None or i <= prune.after_layer else "kept_sequence"
        outputs.append(helper.make_tensor_value_info(names.qkv(i), f32, ["batch", new, (H + 2 * Hkv) * D]))
    if prune is not None:
        outputs.append(helper.make_tensor_value_info(names.KEPT, i64, ["batch", "kept_sequence"]))
    graph = helper.make_graph(g.nodes, "edgetok_decoder", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if gqa else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgetok")
    model.ir_version = min(model.ir_version, 10)  # what current onnxruntime releases read
    return model
