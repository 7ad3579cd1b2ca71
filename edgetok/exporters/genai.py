"""`edgetok export --format onnx --genai`: the decoder graph with onnxruntime-genai's interface,
and the genai_config.json that tells onnxruntime-genai how to drive it.

onnxruntime-genai runs a folder its model builder wrote: model.onnx, genai_config.json, the
tokenizer files. Its decoder takes input_ids, attention_mask, position_ids and
past_key_values.i.key / .value and returns logits and present.i.key / .value; with
past_present_share_buffer it allocates each layer's cache once, at search.max_length, and binds
present to past, so GroupQueryAttention writes the new tokens in place. edgetok's "gqa" graph
(onnx_graph.py) is already that cache's kind (a past buffer with spare capacity; how many of its
slots hold tokens comes in as past_length), so `to_genai_interface` only renames the KV tensors and
derives what edgetok's inputs said from onnxruntime-genai's: past_length from the attention mask,
every position's logits (logits_to_keep 0: genai picks the last itself, and the parity report
reads them all). The weights are edgetok's own (exact zero points, the 8-bit head, its top logits
recomputed from float activations, --activations float): what the graph computes is unchanged.

Only default-domain and com.microsoft operators: no MatMulQ4, no edgetok GroupQueryAttention.
onnxruntime-genai 0.18 does read session_options.custom_ops_library, but only from a directory it
allows, so the folder would have to carry edgetok's compiled library — built for one CPU family
and one ONNX Runtime ABI, CPU only — and stop being a folder any onnxruntime-genai install (and
execution provider) runs. Those operators are speed, not numbers: MatMulNBits at accuracy level
0 multiplies the same codes in float, ONNX Runtime's GroupQueryAttention attends the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgetok.models import names
from edgetok.models.config import ModelConfig
from edgetok.models.manifest import ONNX_MODEL

GENAI_CONFIG = "genai_config.json"


def to_genai_interface(model: onnx.ModelProto, cfg: ModelConfig) -> None:
    """edgetok's "gqa" decoder graph (no pruning point) → onnxruntime-genai's inputs and outputs,
    in place (module docstring)."""
    g = model.graph
    L = cfg.num_layers
    rename = {names.past(k, i): names.genai_past(k, i) for i in range(L) for k in names.KV_KINDS}
    rename |= {names.present(k, i): names.genai_present(k, i) for i in range(L) for k in names.KV_KINDS}
    for n in g.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
        n.output[:] = [rename.get(x, x) for x in n.output]
    inputs = {i.name: i for i in g.input}
    assert set(inputs) == {names.INPUT_IDS, names.POSITION_IDS, names.PAST_LENGTH, names.LOGITS_TO_KEEP,
                           *(names.past(k, i) for i in range(L) for k in names.KV_KINDS)}, "OnnxOptions refuses the rest"
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    Hkv, D = cfg.num_kv_heads, cfg.head_dim
    kv_in = [helper.make_tensor_value_info(names.genai_past(k, i), f32, ["batch", Hkv, "past_sequence", D])
             for i in range(L) for k in names.KV_KINDS]
    del g.input[:]
    g.input.extend([inputs[names.INPUT_IDS],
                    helper.make_tensor_value_info(names.GENAI_ATTENTION_MASK, i64, ["batch", "total_sequence"]),
                    inputs[names.POSITION_IDS], *kv_in])
    outputs = {o.name: o for o in g.output}
    kv_out = [helper.make_tensor_value_info(names.genai_present(k, i), f32, ["batch", Hkv, "present_sequence", D])
              for i in range(L) for k in names.KV_KINDS]
    del g.output[:]  # qkv.i: the tiered cache's queries, which onnxruntime-genai does not read
    g.output.extend([outputs[names.LOGITS], *kv_out])
    # past_length (B, L): the tokens the mask counts minus the new ones, the same for every layer
    # (onnxruntime-genai's cache gives every layer the same tokens); seen by GroupQueryAttention as
    # seqlens_k = past_length + new − 1, as the model builder's graphs compute it from the mask.
    # (batch rows left-padded by onnxruntime-genai count only their real tokens, as there.)
    mask_sum, new, per_row = "genai/mask_sum", "genai/new_tokens", "genai/past_per_row"
    shape_l = numpy_helper.from_array(np.array([1, L], np.int64), "genai/layers_shape")
    keep_all = numpy_helper.from_array(np.array([0], np.int64), names.LOGITS_TO_KEEP)
    axis = numpy_helper.from_array(np.array([1], np.int64), "genai/axis_1")
    g.initializer.extend([shape_l, keep_all, axis])
    prologue = [
        helper.make_node("ReduceSum", [names.GENAI_ATTENTION_MASK, axis.name], [mask_sum], name="genai/ReduceSum", keepdims=1),
        helper.make_node("Shape", [names.INPUT_IDS], [new], name="genai/Shape", start=1, end=2),
        helper.make_node("Sub", [mask_sum, new], [per_row], name="genai/Sub"),
        helper.make_node("Expand", [per_row, shape_l.name], [names.PAST_LENGTH], name="genai/Expand"),
    ]
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(prologue + nodes)


def genai_config(cfg: ModelConfig, tokenizer) -> dict:
    """genai_config.json for a --genai folder: the decoder's names and sizes, greedy search by
    default, the cache shared between past and present (GroupQueryAttention writes in place)."""
    eos = cfg.eos_token_ids or list(tokenizer.eos_ids)
    pad = eos[0] if eos else 0
    bos = next((b for b in (cfg.bos_token_id, tokenizer.bos_id) if b is not None), None)
    return {
        "model": {
            # an integer, always: onnxruntime-genai's config reader wants one, and a model without a
            # BOS token gets none either way (the tokenizer files decide what encoding adds)
            "bos_token_id": pad if bos is None else bos,
            "context_length": cfg.max_context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": ONNX_MODEL,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": names.INPUT_IDS,
                    "attention_mask": names.GENAI_ATTENTION_MASK,
                    "position_ids": names.POSITION_IDS,
                    "past_key_names": names.GENAI_PAST_PATTERN["key"],
                    "past_value_names": names.GENAI_PAST_PATTERN["value"],
                },
                "outputs": {
                    "logits": names.LOGITS,
                    "present_key_names": names.GENAI_PRESENT_PATTERN["key"],
                    "present_value_names": names.GENAI_PRESENT_PATTERN["value"],
                },
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            # onnxruntime-genai's type picks its C++ model class; every edgetok graph is a plain
            # decoder with the interface above (RoPE, windows and norms are inside the graph), which
            # is what its "llama" class drives
            "type": "llama",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "do_sample": False,
            "max_length": cfg.max_context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, cfg: ModelConfig, tokenizer) -> None:
    (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(cfg, tokenizer), indent=4))


def runtime() -> str:
    """What runs a --genai export's parity report."""
    from importlib.metadata import version

    return f"onnxruntime-genai {version('onnxruntime-genai')} (cpu)"


def open_model(folder: Path, threads: int | None = None):
    """onnxruntime-genai's Model of a --genai folder, on the CPU (threads: ONNX Runtime's intra-op)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def genai_logits(folder: Path, tokens: list[int], threads: int | None = None) -> torch.Tensor:
    """(T, V) logits of every position of `tokens`, run by onnxruntime-genai in one prompt pass."""
    import onnxruntime_genai as og

    model = open_model(folder, threads)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(tokens) + 1)  # the shared cache: this long, no longer
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([tokens], np.int32))
    logits = np.asarray(generator.get_output(names.LOGITS))  # (1, T, V)
    return torch.from_numpy(logits[0].astype(np.float32, copy=False))


def genai_greedy(folder: Path, prompt: list[int], max_new_tokens: int, threads: int | None = None) -> list[int]:
    """The tokens onnxruntime-genai's greedy search appends to `prompt` (stopping at an EOS token)."""
    import onnxruntime_genai as og

    model = open_model(folder, threads)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt):]]
