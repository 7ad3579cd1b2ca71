"""`edgetok export --format gguf`: a GGUF file llama.cpp loads (its metadata keys, tensor names and
Q/K layout), the tensor types chosen for it, and the export's own steps (GgufExport, run by
exporters/pipeline.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.exporters import kquants
from edgetok.exporters.allocate import Allocation, allocate, calibration_rounded
from edgetok.exporters.gguf_codes import source_blocks
from edgetok.exporters.gguf_types import (
    TensorType,
    bits_per_weight,
    choose_type,
    encode,
    input_rounding,
    qtype,
    round_trip,
)
from edgetok.exporters.imatrix import Imatrix, collect, read_imatrix
from edgetok.exporters.options import (
    CODE_TYPES,
    GGUF_LADDER,
    QUANTS,
    GgufOptions,
    check_choice,
    higher_precision,
    parse_tensor_type,
)
from edgetok.exporters.quantize import QuantizedModel, QuantizedWeight, quantized_source
from edgetok.exporters.sensitivity import Matrix, Mix, Rounded, RoundTrip, tensor_kl
from edgetok.files import file_sha256, progress_bar, staged
from edgetok.models.checkpoint import stack
from edgetok.models.config import FULL, SLIDING, ModelConfig
from edgetok.models.gguf_file import (
    GEMMA3_27B_LAYERS,
    GEMMA3_LOCAL_THETA,
    GEMMA3_SWA_PATTERN,
    gguf_arch,
    permute_qk,
    permuted_heads,
    stacked_gguf_name,
    stacked_name,
)
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
    is_norm,
    layer,
)
from edgetok.models.sources import Source
from edgetok.models.tokenizer import gguf_tokenizer_fields

IMATRIX_TOKENS, IMATRIX_CHUNK = 8192, 512  # --save-imatrix's default calibration: 16 chunks of 512
DEFAULT_CALIBRATION_TEXT = "built-in essays (end)"
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
    if cfg.arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if scaling.get("rope_type") == "longrope":  # the factors are tensors (_rope_factors)
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_attn_factors(rope_attention_factor(cfg))
    if cfg.qk_norm and gguf_arch(cfg) not in ("qwen3", "gemma3"):
        raise EdgetokError(f"GGUF export of QK-norm supports Qwen3 and Gemma 3 only, not {cfg.arch}")
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


def check_exportable(cfg: ModelConfig) -> None:
    """What llama.cpp can run from a GGUF's metadata: it knows Gemma 3's layer pattern, local RoPE
    base and query scale only as its own constants (models/gguf_file.py), so other values are refused."""
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3":
        raise EdgetokError("GGUF export supports plain and linear-scaled RoPE, not llama3 scaling")
    if cfg.arch != "gemma3":
        if cfg.sliding_window is not None:
            raise EdgetokError("GGUF export supports sliding windows in Gemma 3 models only")
        return
    n = cfg.num_layers
    expected = {
        "layer_types": [FULL if (i + 1) % GEMMA3_SWA_PATTERN == 0 else SLIDING for i in range(n)],
        "rope_local_theta": GEMMA3_LOCAL_THETA,
        "query_pre_attn_scalar": float(cfg.hidden_size // cfg.num_heads if n == GEMMA3_27B_LAYERS else cfg.head_dim),
    }
    for name, value in expected.items():
        if getattr(cfg, name) != value:
            raise EdgetokError(f"GGUF export of Gemma 3 needs {name} = {value} (llama.cpp assumes it), "
                               f"not {getattr(cfg, name)}")


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


def written_type(w: torch.Tensor, quant: str) -> str:
    """The GGUF type `quant` gives w: its fallback where w's rows do not fit `quant`'s blocks."""
    return choose_type("", tuple(w.shape), quant).type


def measure_sensitivity(
    source: Source, quant: str, tokens: list[int], exclude: set[str] = frozenset(), progress=None,
    writes: RoundTrip | None = None,
) -> dict[str, float]:
    """Mean KL(fp32 ‖ model with only this tensor quantized) over `tokens`, per candidate tensor,
    each rounded as `writes` (writer_round_trip's; default: rounded again, no imatrix)."""
    rounded = Rounded(source, tokens, input_rounding)
    matrices = [Matrix(n, (n,), rounded.weight(n).numel(), (written_type(rounded.weight(n), quant),))
                for n in sensitivity_candidates(source.config) if n not in exclude]
    kl = tensor_kl(rounded, matrices, writes or writer_round_trip({}, {}), progress)
    return {name: next(iter(by_type.values())) for name, by_type in kl.items()}


def written_parts(cfg: ModelConfig, name: str) -> tuple[str, ...]:
    """The HF tensors in the rows of the file's tensor named for `name` (tensor_layout's value)."""
    fused = stacked_name(cfg, name)
    return tuple(fused_parts(fused)) if fused is not None else (name,)


def allocation_matrices(cfg: ModelConfig, weights: dict[str, torch.Tensor], fixed: dict[str, str]) -> list[Matrix]:
    """The weight matrices the allocator chooses types for (all but those --tensor-type fixed), by
    the HF name of their first part, with the types each can take after the type plan's fallbacks."""
    matrices = []
    for gg, name in tensor_layout(cfg, weights).items():
        parts = written_parts(cfg, name)
        shape = (sum(weights[p].shape[0] for p in parts), *weights[name].shape[1:])
        if len(shape) != 2 or name in fixed:
            continue
        types = tuple(dict.fromkeys(choose_type(gg, shape, kind).type for kind in GGUF_LADDER))
        matrices.append(Matrix(name, parts, shape[0] * shape[1], types))
    return matrices


def allocate_types(source: Source, options: GgufOptions, fixed: dict[str, str], importance: dict[str, torch.Tensor],
                   stored: dict[str, kquants.Blocks] | None = None,
                   sensitivity: dict[str, dict[str, float]] | None = None) -> Allocation:
    """--quant auto: every matrix's type for --target-bits or --max-kl (exporters/allocate.py),
    each rounded as it will be written (with --imatrix's weights; at a GGUF source's own type, with
    its `stored` blocks, which also offer the source's mix). sensitivity: measured before, as this
    measures it (benchmarks/allocator.py)."""
    stored = stored or {}
    writes = writer_round_trip(importance, stored)
    calibration = calibration_rounded(source, options, input_rounding)
    weight = calibration[0].weight
    parts = {p: written_type(weight(p), kind) for name, kind in fixed.items() for p in written_parts(source.config, name)}
    fixed_rounded = Mix({p: writes(p, weight(p), kind) for p, kind in parts.items()}, parts)
    matrices = allocation_matrices(source.config, source.weights, fixed)
    # the source's mix, where every matrix's stored type is one it can take
    own = {m.name: stored[m.parts[0]].kind for m in matrices if m.parts[0] in stored and stored[m.parts[0]].kind in m.types}
    return allocate(calibration, matrices, writes, lambda m, kind: bits_per_weight(kind),
                    target_bits=options.target_bits, max_kl=options.max_kl, fixed=fixed_rounded,
                    suggested={"the source's own types": own} if len(own) == len(matrices) else None,
                    sensitivity=sensitivity, progress=progress_bar("sensitivity"))


def writer_round_trip(importance: dict[str, torch.Tensor], stored: dict[str, kquants.Blocks]):
    """A matrix as write_gguf writes it at a type: a GGUF source's own values at the type its
    `stored` blocks have (written as they are), else rounded as encode rounds it (with --imatrix's
    weights)."""

    def rounded(name: str, w: torch.Tensor, kind: str) -> torch.Tensor:
        held = stored.get(name)
        return w if held is not None and held.kind == kind else round_trip(w, kind, importance.get(name))

    return rounded


def imatrix_importance(imatrix: Imatrix, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """--imatrix's values by the HF name of the matrix they weight (matched by llama.cpp's names)."""
    result = {}
    for gg, name in tensor_layout(cfg, weights).items():
        values = imatrix.values(gg)
        if values is None or weights[name].dim() != 2:
            continue
        if values.numel() != weights[name].shape[-1]:
            raise EdgetokError(f"the imatrix's {gg} has {values.numel()} columns; this model's has "
                               f"{weights[name].shape[-1]}: it was made for another model")
        result[name] = values
    if not result:
        raise EdgetokError(f"the imatrix names none of this model's weight matrices (it has {', '.join(list(imatrix.sums)[:3])}, …)")
    return result


def calibrated_imatrix(source: Source, options: GgufOptions) -> Imatrix:
    """--save-imatrix: Σ x² of every decoder linear's inputs over the calibration text (the
    diagonal of GPTQ's Hessian, times n / 2), by llama.cpp's names."""
    from edgetok.exporters.calibration import calibration_tokens
    from edgetok.texts import read_text

    text = read_text(options.calib, 0) if options.calib is not None else None
    tokens = calibration_tokens(source.tokenizer, text, options.calib_tokens or IMATRIX_TOKENS, IMATRIX_CHUNK)
    names = {hf: gg for gg, hf in tensor_layout(source.config, source.weights).items() if ".layers." in hf}
    return collect(source, tokens, names, options.calib.name if options.calib else DEFAULT_CALIBRATION_TEXT)


def choose_sensitive(kl: dict[str, float], fraction: float = 1 / 8) -> list[str]:
    """The most sensitive `fraction` of the candidates (at least one)."""
    k = max(1, int(np.ceil(len(kl) * fraction)))
    return sorted(kl, key=kl.get, reverse=True)[:k]


def _file_type(quant: str) -> int:
    """--quant → llama.cpp's file type: the type of most tensors, or all for f32 (a K-quant: its
    "S" mix, every tensor of that type)."""
    import gguf

    name = {"f32": "ALL_F32", "q4_k": "MOSTLY_Q4_K_S", "q5_k": "MOSTLY_Q5_K_S"}.get(quant, f"MOSTLY_{quant.upper()}")
    return int(gguf.LlamaFileType[name])


def gguf_blocks(qw, quant: str) -> np.ndarray:
    """A symmetric QuantizedWeight (N, K) → GGUF blocks (N, K/32 · block bytes) uint8, exactly.

    q4_0 block: fp16 d, then 16 bytes whose low nibbles are codes 0..15 of the block and high
    nibbles codes 16..31; value = (code − 8) · d. q5_0: fp16 d, 4 bytes of the codes' 5th bits (bit
    j: code j's), then the low nibbles as q4_0's; value = (code − 16) · d. q8_0 block: fp16 d, then
    32 int8 = code − 128; value = int8 · d. (gguf-py's gguf.quants dequantizes these layouts.)
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
    if quant == "q8_0":
        body = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    else:
        low = codes & np.uint8(15)
        body = low[..., : group // 2] | (low[..., group // 2 :] << np.uint8(4))
        if quant == "q5_0":
            high = np.packbits(codes >> np.uint8(4), axis=-1, bitorder="little")  # (n, blocks, 4)
            body = np.concatenate([high, body], axis=-1)
    return np.concatenate([d, body], axis=-1).reshape(n, -1)


def code_blocks(codes: QuantizedWeight | kquants.Blocks) -> tuple[np.ndarray, str]:
    """gptq / rsq codes → (the blocks written, their type): a K-quant's or iq4_nl's blocks as they
    are, a group grid's as the CODE_TYPES type of its bits."""
    if isinstance(codes, kquants.Blocks):
        return codes.data, codes.kind
    kind = next(t for t, (bits, group) in CODE_TYPES.items() if (bits, group) == (codes.bits, codes.group_size))
    return gguf_blocks(codes, kind), kind


def tensor_layout(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """The file's tensors in order: llama.cpp's name → the HF name whose tensor (and type
    override) it is — a stacked tensor's first part (phi3's ffn_up: the gate); a tied head is not
    written."""
    layout = {}
    for name in weights:
        if cfg.tie_word_embeddings and name == LM_HEAD:
            continue
        fused = stacked_name(cfg, name)
        if fused is None:
            layout[gguf_name(name, cfg.sandwich_norms)] = name
        elif fused_parts(fused)[0] == name:
            layout[stacked_gguf_name(fused)] = name
    return layout


def tensor_type_overrides(specs: tuple[str, ...], cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """--tensor-type REGEX=TYPE → HF name → TYPE for the weight matrices whose llama.cpp name
    REGEX finds (re.search; the first REGEX that finds a tensor decides, as llama-quantize's
    --tensor-type). A REGEX that finds no matrix of this model is an error: a typo would otherwise
    be a silent no-op."""
    matrices = {gg: hf for gg, hf in tensor_layout(cfg, weights).items() if weights[hf].dim() == 2}
    rules = [(spec, *parse_tensor_type(spec)) for spec in specs]
    result: dict[str, str] = {}
    for spec, pattern, kind in rules:
        found = [gg for gg in matrices if pattern.search(gg)]
        if not found:
            examples = ", ".join(list(matrices)[:2] + [gg for gg in matrices if gg.startswith("blk.0.")][:4])
            raise EdgetokError(f"--tensor-type {spec} matches no weight matrix of this model (llama.cpp's names, "
                               f"such as {examples})")
        for gg in found:
            result.setdefault(matrices[gg], kind)
    return result


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
    importance: dict[str, torch.Tensor] | None = None, stored: dict[str, kquants.Blocks] | None = None,
) -> list[TensorType]:
    """Write `source` as a GGUF file at `path`; returns the type plan (every tensor's type, and
    why where it is not the one asked for).

    overrides: HF tensor name → --quant name for tensors that get another type (--keep-sensitive).
    quantized: HF tensor name → gptq / rsq codes (a QuantizedWeight or kquants.Blocks) on the grid of
    the type the plan gives the tensor, written as they are (`code_blocks`); the other tensors are
    quantized here: by llama.cpp's own rounding (gguf-py) for the 32-value types, by
    exporters/kquants.py for the K-quants and iq4_nl.
    importance: HF tensor name → an imatrix's values (K,) weighting that tensor's rounding.
    stored: HF tensor name → a GGUF source's own blocks (gguf_codes.source_blocks): a tensor the
    plan gives their type is written with them, as llama.cpp's quantizer keeps a tensor already at
    the type asked (its weights are those blocks' values: rounding them again could only move a code).
    """
    import gguf

    check_choice("--quant", quant, QUANTS)
    cfg = source.config
    check_exportable(cfg)
    overrides = overrides or {}
    writer = gguf.GGUFWriter(path, gguf_arch(cfg))
    writer.add_name(str(source.info.get("name") or source.path.name))
    _metadata(writer, cfg, _file_type(quant))
    for key, value in gguf_tokenizer_fields(source.tokenizer).items():
        _add_field(writer, key, value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _rope_factors(writer, cfg)
    weights = source.weights
    plan = []
    for gg, name in tensor_layout(cfg, weights).items():
        tensor, codes = weights[name], (quantized or {}).get(name)
        fused = stacked_name(cfg, name)
        if fused is not None:  # one tensor for all its parts (phi3's ffn_up: gate, then up)
            tensor = stack(weights, fused)
            parts = [quantized.get(p) for p in fused_parts(fused)] if quantized else [None]
            codes = type(parts[0]).cat_rows(parts) if all(q is not None for q in parts) else None
        heads = permuted_heads(name, cfg)
        if codes is not None and name not in overrides:
            data, kind = code_blocks(_file_rows(codes, heads))
            planned = choose_type(gg, codes.shape, quant)
            if planned.type != kind:  # chosen for this tensor (the allocator, --tensor-type): asked as such
                planned = choose_type(gg, codes.shape, kind)
            writer.add_tensor(gg, data, raw_dtype=qtype(kind))
            plan.append(planned)
            continue
        w = tensor.float()
        if heads is not None:
            w = torch.from_numpy(permute_qk(w.numpy(), heads))
        if cfg.norm_offset and is_norm(name):  # llama.cpp multiplies by the stored weight itself
            w = w + cfg.norm_offset
        planned = choose_type(gg, tuple(w.shape), overrides.get(name, quant))
        held = [(stored or {}).get(p) for p in written_parts(cfg, name)]
        if all(b is not None and b.kind == planned.type for b in held):
            writer.add_tensor(gg, _file_rows(kquants.Blocks.cat_rows(held), heads).data, raw_dtype=qtype(planned.type))
            planned = replace(planned, kept=True)
        else:
            data, dtype = encode(w, planned.type, (importance or {}).get(name))
            writer.add_tensor(gg, data, raw_dtype=dtype)
        plan.append(planned)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return plan


def _file_rows(codes, heads: int | None):
    """Codes in the HF row order → in the file's (q/k: the order permute_qk gives the float weight)."""
    return codes if heads is None else codes.rows(torch.from_numpy(permute_qk(np.arange(codes.shape[0]), heads)))


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
        if options.save_imatrix is not None:
            self.outputs.append(options.save_imatrix)

    def code_grid(self, source: Source) -> dict:
        """gptq / rsq codes on the grid of the GGUF type each linear will be written as (quantize.gptq_as):
        --tensor-type's, the allocator's (chosen here, before calibration, from the source's
        sensitivity to round to nearest — for rsq, the unrotated model's), or --quant's, with the type
        plan's fallback where rows are not whole blocks. A type with no gptq grid is left to the writer."""
        o = self.options
        chosen = tensor_type_overrides(o.tensor_type, source.config, source.weights)
        if o.allocates:
            self.allocation = allocate_types(source, o, chosen, {})
            chosen = self.allocation.types | chosen
        by_part = {p: kind for name, kind in chosen.items() for p in written_parts(source.config, name)}
        return {"gguf_type": lambda name, shape: choose_type(name, shape, by_part.get(name, o.quant)).type}

    def prepare(self, source: Source, qm: QuantizedModel | None, tokens: list[int]) -> None:
        """What is written (gptq / rsq: the codes, and the float weights they approximate, for the
        rest and for --keep-sensitive) and each tensor's type."""
        quant = self.options.quant
        self.written = source if qm is None else quantized_source(source, qm)
        self.codes, self.quantization = ({}, None) if qm is None else (qm.quantized(), qm.info)
        # a GGUF source's blocks, kept where a tensor keeps its type (gptq / rsq write their own codes)
        self.stored = source_blocks(source.path, source.config) if qm is None and source.format == "gguf" else {}
        # checked first: a pattern that finds nothing fails before the slow part
        self.user_types = tensor_type_overrides(self.options.tensor_type, self.written.config, self.written.weights)
        self.overrides = default_overrides(self.written.config, quant)
        self.sensitivity_kl, self.file_quant, self.raised = None, quant, set()
        self.allocation = getattr(self, "allocation", None)  # code_grid's, when gptq / rsq calibrated on it
        o = self.options
        self.importance = {} if o.imatrix is None else imatrix_importance(read_imatrix(o.imatrix), self.written.config,
                                                                           self.written.weights)
        self.saved_imatrix = None if o.save_imatrix is None else calibrated_imatrix(self.written, o)
        if self.options.allocates:
            if self.allocation is None:
                self.allocation = allocate_types(self.written, self.options, self.user_types, self.importance, self.stored)
            self.overrides = dict(self.allocation.types)
            self.file_quant = Counter(self.overrides.values()).most_common(1)[0][0]  # llama.cpp's file type
        if self.options.keep_sensitive:
            kl = measure_sensitivity(self.written, quant, tokens[:SENSITIVITY_TOKENS], set(self.overrides),
                                     progress_bar("sensitivity"), writer_round_trip(self.importance, self.stored))
            self.raised = set(choose_sensitive(kl))
            self.overrides |= dict.fromkeys(self.raised, higher_precision(quant))
            self.sensitivity_kl = {k: round(v, 6) for k, v in sorted(kl.items(), key=lambda kv: -kv[1])}

    def write(self, source: Source, paths: list[Path]) -> GgufManifest:
        o = self.options
        # gptq / rsq codes sit on the allocator's and --tensor-type's types already (code_grid): written as
        # they are, but for the matrices --keep-sensitive raised after calibration
        types = {n: kind for n, kind in (self.overrides | self.user_types).items() if n not in self.codes or n in self.raised}
        plan = write_gguf(self.written, paths[0], self.file_quant, types, self.codes, self.importance, self.stored)
        if self.saved_imatrix is not None:
            self.saved_imatrix.write(paths[2])
        imatrix = None
        if o.imatrix is not None:
            imatrix = {"file": o.imatrix.name, "sha256": file_sha256(o.imatrix), "tensors_weighted": len(self.importance)}
        kept = {} if self.allocation else {name: kind for name, kind in self.overrides.items() if name not in self.user_types}
        return GgufManifest(source=SourceRecord.of(source, beside=o.output.parent), quant=o.quant,
                            architecture=source.config.arch, method=o.method, quantization=self.quantization,
                            sensitivity_kl=self.sensitivity_kl, kept_at_higher_precision=kept,
                            tensor_types=self.user_types or None,
                            type_plan=[t.to_json() for t in plan],
                            allocation=self.allocation.to_json() if self.allocation else None, imatrix=imatrix,
                            size_bytes=paths[0].stat().st_size, sha256=file_sha256(paths[0]))

    def logits(self, paths: list[Path], tokens: list[int]) -> torch.Tensor:
        from edgetok.runtimes.backends.llamacpp import llamacpp_logits

        return llamacpp_logits(paths[0], tokens, self.options.threads)

    def finish(self, manifest: GgufManifest, paths: list[Path], seconds: float) -> None:
        manifest.write(paths[1])
