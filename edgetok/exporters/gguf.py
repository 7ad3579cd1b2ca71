"""Write a model as a GGUF file llama.cpp loads: its metadata keys, tensor names and Q/K layout."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.models.config import ModelConfig
from edgetok.models.gguf_file import TENSOR_NAMES, permute_qk
from edgetok.models.sources import Source
from edgetok.models.tokenizer import gguf_tokenizer_fields

# --quant name → (tensor type of 2-D weights, llama.cpp file type name)
QUANT_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
GGUF_NAMES = {hf: gg for gg, hf in TENSOR_NAMES.items()}


def gguf_name(hf: str) -> str:
    parts = hf.split(".")
    if hf.startswith("model.layers."):
        return GGUF_NAMES[".".join(parts[:2] + ["{i}"] + parts[3:])].format(i=parts[2])
    return GGUF_NAMES[hf]


def _metadata(writer, cfg: ModelConfig, file_type: int) -> None:
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_context)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


def higher_precision(quant: str) -> str | None:
    """The type --keep-sensitive gives the tensors it keeps (as llama.cpp's _M mixes: q8_0 over 4/5-bit)."""
    return {"q8_0": "f16"}.get(quant, "q8_0" if quant.startswith(("q4", "q5")) else None)


def default_overrides(cfg: ModelConfig, quant: str) -> dict[str, str]:
    """As llama.cpp's quantize does, the output projection (the embedding, when tied) stays at
    q8_0 under 4/5-bit types: it is the tensor whose error every token's logits see."""
    upgrade = higher_precision(quant)
    if upgrade is None or quant == "q8_0":
        return {}
    return {"model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight": upgrade}


def sensitivity_candidates(cfg: ModelConfig) -> list[str]:
    """The tensors llama.cpp's mixes consider upgrading: embedding, output, attn_v and ffn_down."""
    names = ["model.embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.self_attn.v_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"]
    return names


def fake_quantize(w: torch.Tensor, quant: str) -> torch.Tensor:
    """w after a round trip through the GGUF type of `quant` (what llama.cpp will compute with)."""
    from gguf.quants import dequantize

    data, qtype = _tensor_data(w.float().numpy(), _qtype(quant))
    return torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32).reshape(w.shape))


def measure_sensitivity(
    source: Source, quant: str, tokens: list[int], exclude: set[str] = frozenset(), progress=None
) -> dict[str, float]:
    """Mean KL(fp32 ‖ model with only this tensor quantized) over `tokens`, per candidate tensor."""
    from edgetok.exporters.verify import compare, model_logits
    from edgetok.models.llama import LlamaModel

    model = LlamaModel.from_state_dict(source.config, source.weights)
    params = dict(model.named_parameters(remove_duplicate=False))
    reference = model_logits(model, tokens)
    result = {}
    names = [n for n in sensitivity_candidates(source.config) if n not in exclude]
    for name in progress(names, len(names)) if progress else names:
        param = params[name]
        original = param.data
        param.data = fake_quantize(original, quant)
        result[name] = compare(reference, model_logits(model, tokens), tokens).kl_mean
        param.data = original
    return result


def choose_sensitive(kl: dict[str, float], fraction: float = 1 / 8) -> list[str]:
    """The most sensitive `fraction` of the candidates (at least one)."""
    k = max(1, int(np.ceil(len(kl) * fraction)))
    return sorted(kl, key=kl.get, reverse=True)[:k]


def _qtype(quant: str):
    import gguf

    return gguf.GGMLQuantizationType[QUANT_TYPES[quant][0]]


def _tensor_data(w: np.ndarray, qtype):
    """→ (array to write, GGML type). 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them."""
    import gguf
    from gguf.quants import quantize

    if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:  # rows that do not fill whole blocks cannot take this type
        return w.astype(np.float16), gguf.GGMLQuantizationType.F16
    return quantize(w, qtype), qtype


# --quant name → (bits, group size) of the codes a QuantizedWeight must hold to be written as it is.
CODE_TYPES = {"q4_0": (4, 32), "q8_0": (8, 32)}


def gguf_blocks(qw, quant: str) -> np.ndarray:
    """A symmetric QuantizedWeight (N, K) → GGUF blocks (N, K/32 · block bytes) uint8, exactly.

    q4_0 block: fp16 d, then 16 bytes whose low nibbles are codes 0..15 of the block and high
    nibbles codes 16..31; value = (code − 8) · d. q8_0 block: fp16 d, then 32 int8 = code − 128;
    value = int8 · d. (gguf-py's gguf.quants dequantizes these layouts.)
    """
    bits, group = CODE_TYPES[quant]
    n, k = qw.shape
    if (qw.bits, qw.group_size) != (bits, group) or not qw.symmetric:
        raise ValueError(f"{quant} blocks need symmetric {bits}-bit codes in groups of {group}, "
                         f"not {qw.bits}-bit in groups of {qw.group_size}")
    d = qw.scale.half()
    if not torch.equal(d.float(), qw.scale):
        raise ValueError("the scales are not fp16 values: quantize with scale_dtype=torch.float16")
    d = d.numpy().view(np.uint8).reshape(n, k // group, 2)
    codes = qw.q.numpy().reshape(n, k // group, group)
    if quant == "q4_0":
        body = codes[..., : group // 2] | (codes[..., group // 2 :] << np.uint8(4))
    else:
        body = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([d, body], axis=-1).reshape(n, -1)


def export_gguf(
    source: Source, out: Path, quant: str = "f16", force: bool = False, overrides: dict[str, str] | None = None,
    quantized: dict | None = None,
) -> Path:
    """Write `source` to `out` atomically (a temporary file beside it, then rename).

    overrides: HF tensor name → --quant name for tensors that get another type (--keep-sensitive).
    quantized: HF tensor name → QuantizedWeight whose codes are written as `quant` blocks as they
    are (gptq, rsq); the other tensors are quantized here by llama.cpp's own rounding.
    """
    import gguf

    if quant not in QUANT_TYPES:
        raise EdgetokError(f"unknown --quant '{quant}' (choose from {', '.join(QUANT_TYPES)})")
    if out.exists() and not force:
        raise EdgetokError(f"{out} exists; pass --force to overwrite it")
    cfg = source.config
    if cfg.sliding_window is not None or cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3":
        raise EdgetokError("GGUF export supports plain and linear-scaled RoPE without sliding windows")
    file_type_name = QUANT_TYPES[quant][1]
    overrides = overrides or {}
    arch = "qwen2" if cfg.arch == "qwen2" else "llama"

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(str(source.info.get("name") or source.path.name))
        _metadata(writer, cfg, int(gguf.LlamaFileType[file_type_name]))
        for key, value in gguf_tokenizer_fields(source.tokenizer).items():
            _add_field(writer, key, value)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, tensor in source.weights.items():
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            heads = {".q_proj.": cfg.num_heads, ".k_proj.": cfg.num_kv_heads}
            heads = next((h for part, h in heads.items() if part in name), None) if arch == "llama" else None
            if quantized and name in quantized and name not in overrides:
                qw = quantized[name]
                if heads is not None:  # the same row order as permute_qk gives the float weight
                    qw = qw.rows(torch.from_numpy(permute_qk(np.arange(qw.shape[0]), heads)))
                data, dtype = gguf_blocks(qw, quant), _qtype(quant)
                writer.add_tensor(gguf_name(name), data, raw_dtype=dtype)
                continue
            w = tensor.float().numpy()
            if heads is not None:
                w = permute_qk(w, heads)
            data, dtype = _tensor_data(w, _qtype(overrides.get(name, quant)))
            writer.add_tensor(gguf_name(name), data, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _add_field(writer, key: str, value) -> None:
    """Typed add for the tokenizer fields (GGUFWriter needs the type of each array)."""
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif key == "tokenizer.ggml.token_type":
        writer.add_array(key, value)  # ints → INT32 array
    elif key == "tokenizer.ggml.scores":
        writer.add_array(key, [float(s) for s in value])
    else:
        writer.add_array(key, value)
    del gguf
