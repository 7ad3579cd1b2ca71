"""Every name an artifact shares between writer and reader, defined once (as gguf-py's constants.py).

- Hugging Face tensor names: edgetok's weights are HF-named whatever the model came as.
- The linear-layer tables: which linears a decoder layer has, which read the same input, which
  the ONNX graph fuses, which read and write the residual stream.
- llama.cpp's tensor names ↔ HF's.
- The ONNX decoder graph's inputs and outputs (exporters/onnx_graph.py builds them; the
  onnxruntime backend binds them), and the names of onnxruntime-genai's and optimum's graphs.

A plain module (no torch, no onnx): the runtime imports it without the exporters.
"""

from __future__ import annotations

import re

# -- Hugging Face tensor names ------------------------------------------------------------------------
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm"  # a module: its tensor is FINAL_NORM + ".weight"
ROPE_FREQS = "rope_freqs"  # llama.cpp's per-frequency RoPE divisors (Llama 3 GGUFs); not an HF name
HEAD_WEIGHTS = (EMBEDDING, LM_HEAD)  # one matrix when the embeddings are tied

INPUT_NORM = "input_layernorm"  # the norm before attention, in each layer
POST_ATTENTION_NORM = "post_attention_layernorm"  # the norm before the MLP (Llama); after attention (Gemma)
PRE_FFN_NORM = "pre_feedforward_layernorm"  # Gemma's norm before the MLP
POST_FFN_NORM = "post_feedforward_layernorm"  # Gemma's norm after the MLP
Q_NORM, K_NORM = "self_attn.q_norm", "self_attn.k_norm"  # QK-norm: over each query / key head (Qwen3, Gemma 3)


def layer(i: int | str, name: str) -> str:
    """Layer i's module or tensor `name` ("self_attn.q_proj.weight" → "model.layers.3.self_attn.q_proj.weight")."""
    return f"model.layers.{i}.{name}"


# -- the linears of a decoder layer ---------------------------------------------------------------------
Q_PROJ, K_PROJ, V_PROJ, O_PROJ = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE_PROJ, UP_PROJ, DOWN_PROJ = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
QKV = (Q_PROJ, K_PROJ, V_PROJ)
GATE_UP = (GATE_PROJ, UP_PROJ)
LINEARS = (*QKV, O_PROJ, *GATE_UP, DOWN_PROJ)

# The norm whose output each group reads (rotation folds the norm's weight into them).
NORM_INPUTS = {INPUT_NORM: QKV, POST_ATTENTION_NORM: GATE_UP}
# (Rotation folds only these: Gemma's sandwich norms are not rotation-invariant, so it refuses them.)
# Linears reading the residual stream and writing into it (rotation turns them opposite ways).
READS_STREAM = (*QKV, *GATE_UP)
WRITES_STREAM = (O_PROJ, DOWN_PROJ)
# The ONNX graph runs each group of several as one MatMul, named by its fused module; rows stack.
QKV_FUSED, GATE_UP_FUSED = "self_attn.qkv_proj", "mlp.gate_up_proj"
FUSED = {QKV_FUSED: QKV, GATE_UP_FUSED: GATE_UP}


def fused_parts(name: str) -> list[str] | None:
    """The HF weight names stacked in a fused tensor's rows ("...qkv_proj.weight"), else None."""
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            return [name.replace(fused, part) for part in parts]
    return None


# -- llama.cpp's tensor names ----------------------------------------------------------------------------
GGUF_GLOBAL = {
    "token_embd.weight": EMBEDDING,
    "output_norm.weight": f"{FINAL_NORM}.weight",
    "output.weight": LM_HEAD,
    "rope_freqs.weight": ROPE_FREQS,
}
# blk.{i}.<key> → model.layers.{i}.<value>
GGUF_LAYER = {
    "attn_norm.weight": f"{INPUT_NORM}.weight",
    "ffn_norm.weight": f"{POST_ATTENTION_NORM}.weight",
    "attn_q_norm.weight": f"{Q_NORM}.weight",
    "attn_k_norm.weight": f"{K_NORM}.weight",
    **{f"{gg}.{kind}": f"{hf}.{kind}" for gg, hf in (("attn_q", Q_PROJ), ("attn_k", K_PROJ), ("attn_v", V_PROJ),
                                                     ("attn_output", O_PROJ)) for kind in ("weight", "bias")},
    **{f"{gg}.weight": f"{hf}.weight" for gg, hf in (("ffn_gate", GATE_PROJ), ("ffn_up", UP_PROJ), ("ffn_down", DOWN_PROJ))},
    "attn_qkv.weight": f"{QKV_FUSED}.weight",  # phi3's, as llama.cpp's converter writes it
}
# Gemma's four norms per layer: llama.cpp's ffn_norm is the norm before the MLP, which HF names
# pre_feedforward_layernorm there (its post_attention_layernorm follows attention).
GGUF_LAYER_SANDWICH = GGUF_LAYER | {
    "ffn_norm.weight": f"{PRE_FFN_NORM}.weight",
    "post_attention_norm.weight": f"{POST_ATTENTION_NORM}.weight",
    "post_ffw_norm.weight": f"{POST_FFN_NORM}.weight",
}
# Phi-3's longrope factors, as llama.cpp keeps them: tensors (head_dim / 2,) beside the layers
GGUF_ROPE_FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
# The linears llama.cpp stacks per architecture: phi3's ffn_up holds gate and up (2·I rows)
GGUF_STACKED = {"phi3": (GATE_UP_FUSED,)}
_HF_GLOBAL = {hf: gg for gg, hf in GGUF_GLOBAL.items()}
_HF_LAYER = {hf: gg for gg, hf in GGUF_LAYER.items()}
_HF_LAYER_SANDWICH = {hf: gg for gg, hf in GGUF_LAYER_SANDWICH.items()}


def hf_name(gguf_name: str, sandwich: bool = False) -> str | None:
    """llama.cpp's tensor name → HF's, or None for a tensor edgetok does not know.
    sandwich: the model has Gemma's four norms per layer (ModelConfig.sandwich_norms)."""
    m = re.fullmatch(r"blk\.(\d+)\.(.*)", gguf_name)
    if m is None:
        return GGUF_GLOBAL.get(gguf_name)
    hf = (GGUF_LAYER_SANDWICH if sandwich else GGUF_LAYER).get(m.group(2))
    return layer(m.group(1), hf) if hf else None


def gguf_name(hf: str, sandwich: bool = False) -> str:
    """HF's tensor name → llama.cpp's (KeyError for a tensor GGUF files do not hold)."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", hf)
    if m is None:
        return _HF_GLOBAL[hf]
    return f"blk.{m.group(1)}.{(_HF_LAYER_SANDWICH if sandwich else _HF_LAYER)[m.group(2)]}"


def is_norm(name: str) -> bool:
    """Whether the HF-named tensor is an RMSNorm's weight (Gemma's GGUFs store them plus one)."""
    return name.endswith("norm.weight")


# -- the ONNX decoder graph's inputs and outputs (see exporters/onnx_graph.py for shapes) ------------------
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
PAST_LENGTH = "past_length"
LOGITS_TO_KEEP = "logits_to_keep"
PRUNE_KEEP = "prune_keep"  # only in graphs that can prune a prompt
PRUNE_FORCED = "prune_forced"  # only in graphs that can prune a prompt (from edgetok 0.1's Gemma pass on)
LOGITS = "logits"
KEPT = "kept"  # only in graphs that can prune a prompt
# only in graphs that prune a model with sliding-window layers after the pruning point
PAST_POSITIONS = "past_positions"
KV_KINDS = ("key", "value")


def past(kind: str, i: int) -> str:
    """Layer i's past keys or values (kind "key" or "value"): past_key.3."""
    return f"past_{kind}.{i}"


def present(kind: str, i: int) -> str:
    """Layer i's keys or values after the call: present_value.3."""
    return f"present_{kind}.{i}"


def qkv(i: int) -> str:
    """Layer i's fused q/k/v projection (before RoPE): qkv.3."""
    return f"qkv.{i}"


def io_names(num_layers: int, prune: bool, positions: bool = False) -> dict[str, list[str]]:
    """The graph's inputs and outputs in order, as the ONNX manifest records them; positions: the
    graph reads PAST_POSITIONS (a pruning point before sliding-window layers)."""
    kv = lambda name: [name(kind, i) for i in range(num_layers) for kind in KV_KINDS]  # noqa: E731
    return {
        "inputs": [INPUT_IDS, POSITION_IDS, PAST_LENGTH, LOGITS_TO_KEEP, *([PRUNE_KEEP, PRUNE_FORCED] if prune else []),
                   *([PAST_POSITIONS] if positions else []), *kv(past)],
        "outputs": [LOGITS, *kv(present), *(qkv(i) for i in range(num_layers)), *([KEPT] if prune else [])],
    }


# -- onnxruntime-genai's names for the same graph (edgetok export --genai; exporters/genai.py) ------------
# As onnxruntime-genai's model builder names them: genai_config.json's decoder inputs / outputs say
# so too, but other tools (and genai's defaults) expect these.
GENAI_ATTENTION_MASK = "attention_mask"  # int64 (B, past + new): 1 for every token the model sees
GENAI_PAST_PATTERN = {"key": "past_key_values.%d.key", "value": "past_key_values.%d.value"}
GENAI_PRESENT_PATTERN = {"key": "present.%d.key", "value": "present.%d.value"}


def genai_past(kind: str, i: int) -> str:
    """Layer i's past keys or values under onnxruntime-genai's name: past_key_values.3.key."""
    return GENAI_PAST_PATTERN[kind] % i


def genai_present(kind: str, i: int) -> str:
    """Layer i's keys or values after the call, under onnxruntime-genai's name: present.3.value."""
    return GENAI_PRESENT_PATTERN[kind] % i


def genai_io_names(num_layers: int) -> dict[str, list[str]]:
    """A --genai graph's inputs and outputs in order, as its manifest records them."""
    kv = lambda name: [name(kind, i) for i in range(num_layers) for kind in KV_KINDS]  # noqa: E731
    return {"inputs": [INPUT_IDS, GENAI_ATTENTION_MASK, POSITION_IDS, *kv(genai_past)],
            "outputs": [LOGITS, *kv(genai_present)]}


# -- optimum's decoder graph (optimum-cli export onnx --task text-generation-with-past) ----------------
# Both follow transformers' past_key_values, so optimum's graph has the --genai graph's names: inputs
# input_ids, attention_mask, position_ids, past_key_values.N.key / value; outputs logits and
# present.N.key / value. Its presents are the past with the new tokens after it (B, Hkv, P + T, D).
optimum_io_names = genai_io_names
