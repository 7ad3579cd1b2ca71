"""`edgetok export --format gguf`: a GGUF file llama.cpp loads (its metadata keys, tensor names and
Q/K layout), the tensor types chosen for it, and the export's own steps (GgufExport, run by
exporters/pipeline.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.exporters.options import CODE_TYPES, QUANTS, GgufOptions, check_choice, higher_precision
from edgetok.exporters.quantize import QuantizedModel, QuantizedWeight, quantized_source
from edgetok.files import file_sha256, progress_bar, staged
from edgetok.models.checkpoint import stack
from edgetok.models.config import ModelConfig
from edgetok.models.gguf_file import gguf_arch, permute_qk, permuted_heads, stacked_gguf_name, stacked_name
from edgetok.models.llama import longrope_long, rope_attention_factor
from edgetok.models.manifest import GgufManifest, SourceRecord, gguf_report_path
from edgetok.models.names import (
    DOWN_PROJ,
    EMBEDDING,
    GGUF_ROPE_FACTORS,
    LM_HEAD,
    V_PROJ,
    fused_parts,
    gguf_name,
    layer,
)
from edgetok.models.sources import Source
from edgetok.models.tokenizer import gguf_tokenizer_fields

SENSITIVITY_TOKENS = 128  # of the evaluation text, per candidate tensor: --keep-sensitive runs the model once each

# GGUFWriter.add_<key>(value of the config field), the architecture's keys in llama.cpp's names
_METADATA = (
    ("block_count", "num_layers"), ("context_length", "max_context"), ("embedding_length", "hidden_size"),
    ("feed_forward_length", "intermediate_size"), ("head_count", "num_heads"), ("head_count_kv", "num_kv_heads"),
    ("rope_freq_base", "rope_theta"), ("layer_norm_rms_eps", "rms_norm_eps"), ("rope_dimension_count", "head_dim"),
    ("key_length", "head_dim"), ("value_length", "head_dim"), ("vocab_size", "vocab_size"),
)


def _metadata(writer, cfg: ModelConfig, file_type: int) -> None:
    for key, attr in _METADATA:
        getattr(writer, f"add_{key}")(getattr(cfg, attr))
    writer.add_file_type(file_type)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if scaling.get("rope_type") == "longrope":  # the factors are tensors (_rope_factors)
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_attn_factors(rope_attention_factor(cfg))
    if cfg.qk_norm and gguf_arch(cfg) != "qwen3":
        raise EdgetokError(f"GGUF export of QK-norm supports Qwen3 only, not {cfg.arch}")
    if cfg.o_bias and gguf_arch(cfg) == "qwen3":
        raise EdgetokError("GGUF export cannot write this Qwen3's attention output bias: llama.cpp's qwen3 has none")


def _rope_factors(writer, cfg: ModelConfig) -> None:
    """longrope's per-frequency divisors as llama.cpp's two tensors. Both hold the set edgetok
    chose for max_context (longrope_long): llama.cpp would choose again by its own n_ctx, and a
    parity report runs it at a few hundred tokens; this way the file computes what edgetok does at
    any n_ctx."""
    if (cfg.rope_scaling or {}).get("rope_type") != "longrope":
        return
    chosen = cfg.rope_scaling["long_factor" if longrope_long(cfg) else "short_factor"]
    for gg in GGUF_ROPE_FACTORS.values():
        writer.add_tensor(gg, np.asarray(chosen, dtype=np.float32))


def default_overrides(cfg: ModelConfig, quant: str) -> dict[str, str]:
    """As llama.cpp's quantize does, the output projection (the embedding, when tied) stays at
    q8_0 under 4/5-bit types: it is the tensor whose error every token's logits see."""
    upgrade = higher_precision(quant)
    if upgrade is None or quant == "q8_0":
        return {}
    return {EMBEDDING if cfg.tie_word_embeddings else LM_HEAD: upgrade}


def sensitivity_candidates(cfg: ModelConfig) -> list[str]:
    """The tensors llama.cpp's mixes consider upgrading: embedding, output, attn_v and ffn_down."""
    names = [EMBEDDING] + ([] if cfg.tie_word_embeddings else [LM_HEAD])
    for i in range(cfg.num_layers):
        names += [layer(i, f"{V_PROJ}.weight"), layer(i, f"{DOWN_PROJ}.weight")]
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
    """--quant → gguf-py's tensor type (its name in capitals)."""
    import gguf

    return gguf.GGMLQuantizationType[quant.upper()]


def _file_type(quant: str) -> int:
    """--quant → llama.cpp's file type: the type of most tensors, or all for f32."""
    import gguf

    return int(gguf.LlamaFileType["ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}"])


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
    """Write `source` to `out` atomically (a temporary file beside it, then rename); see write_gguf."""
    with staged([out], force) as (path,):
        write_gguf(source, path, quant, overrides, quantized)
    return out


def write_gguf(
    source: Source, path: Path, quant: str = "f16", overrides: dict[str, str] | None = None, quantized: dict | None = None,
) -> None:
    """Write `source` as a GGUF file at `path`.

    overrides: HF tensor name → --quant name for tensors that get another type (--keep-sensitive).
    quantized: HF tensor name → QuantizedWeight whose codes are written as `quant` blocks as they
    are (gptq, rsq); the other tensors are quantized here by llama.cpp's own rounding.
    """
    import gguf

    check_choice("--quant", quant, QUANTS)
    cfg = source.config
    if cfg.sliding_window is not None or cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3":
        raise EdgetokError("GGUF export supports plain and linear-scaled RoPE without sliding windows")
    overrides = overrides or {}
    writer = gguf.GGUFWriter(path, gguf_arch(cfg))
    writer.add_name(str(source.info.get("name") or source.path.name))
    _metadata(writer, cfg, _file_type(quant))
    for key, value in gguf_tokenizer_fields(source.tokenizer).items():
        _add_field(writer, key, value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _rope_factors(writer, cfg)
    weights = source.weights
    for name in weights:
        if cfg.tie_word_embeddings and name == LM_HEAD:
            continue
        gg, tensor, codes = gguf_name(name), weights[name], (quantized or {}).get(name)
        fused = stacked_name(cfg, name)
        if fused is not None:  # one tensor for all its parts (phi3's ffn_up: gate, then up), at the first
            if fused_parts(fused)[0] != name:
                continue
            gg, tensor = stacked_gguf_name(fused), stack(weights, fused)
            parts = [quantized.get(p) for p in fused_parts(fused)] if quantized else [None]
            codes = QuantizedWeight.cat_rows(parts) if all(q is not None for q in parts) else None
        heads = permuted_heads(name, cfg)
        if codes is not None and name not in overrides:
            if heads is not None:  # the same row order as permute_qk gives the float weight
                codes = codes.rows(torch.from_numpy(permute_qk(np.arange(codes.shape[0]), heads)))
            writer.add_tensor(gg, gguf_blocks(codes, quant), raw_dtype=_qtype(quant))
            continue
        w = tensor.float().numpy()
        if heads is not None:
            w = permute_qk(w, heads)
        data, dtype = _tensor_data(w, _qtype(overrides.get(name, quant)))
        writer.add_tensor(gg, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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


class GgufExport:
    """One GGUF export (exporters/pipeline.py's FormatExport): the file and its report beside it."""

    runtime = "llama.cpp (llama-cpp-python)"
    marker = None  # the outputs are files

    def __init__(self, options: GgufOptions) -> None:
        self.options = options
        self.outputs = [options.output, gguf_report_path(options.output)]

    def code_grid(self) -> tuple[int, int, dict]:
        """gptq / rsq codes on the grid of a GGUF block type: symmetric, groups of 32, fp16 scales."""
        bits, group = CODE_TYPES[self.options.quant]
        return bits, group, {"symmetric": True, "scale_dtype": torch.float16}

    def prepare(self, source: Source, qm: QuantizedModel | None, tokens: list[int]) -> None:
        """What is written (gptq / rsq: the codes, and the float weights they approximate, for the
        rest and for --keep-sensitive) and each tensor's type."""
        quant = self.options.quant
        self.written = source if qm is None else quantized_source(source, qm)
        self.codes, self.quantization = (None, None) if qm is None else (qm.quantized(), qm.info)
        self.overrides = default_overrides(self.written.config, quant)
        self.sensitivity_kl = None
        if self.options.keep_sensitive:
            kl = measure_sensitivity(self.written, quant, tokens[:SENSITIVITY_TOKENS], set(self.overrides),
                                     progress_bar("sensitivity"))
            self.overrides |= {name: higher_precision(quant) for name in choose_sensitive(kl)}
            self.sensitivity_kl = {k: round(v, 6) for k, v in sorted(kl.items(), key=lambda kv: -kv[1])}

    def write(self, source: Source, paths: list[Path]) -> GgufManifest:
        o = self.options
        write_gguf(self.written, paths[0], o.quant, self.overrides, self.codes)
        return GgufManifest(source=SourceRecord.of(source, beside=o.output.parent), quant=o.quant,
                            architecture=source.config.arch, method=o.method, quantization=self.quantization,
                            sensitivity_kl=self.sensitivity_kl, kept_at_higher_precision=self.overrides,
                            size_bytes=paths[0].stat().st_size, sha256=file_sha256(paths[0]))

    def logits(self, paths: list[Path], tokens: list[int]) -> torch.Tensor:
        from edgetok.runtimes.backends.llamacpp import llamacpp_logits

        return llamacpp_logits(paths[0], tokens, self.options.threads)

    def finish(self, manifest: GgufManifest, paths: list[Path], seconds: float) -> None:
        manifest.write(paths[1])
