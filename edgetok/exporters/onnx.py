"""`edgetok export --format onnx`'s own steps: decoder graph → weight rewrite → folder.

The folder holds model.onnx (+ model.onnx.data), the tokenizer, config.json for HF tools, and
edgetok.json (models/manifest.py's OnnxManifest): where it came from, how it was quantized, the
graph's I/O names and the parity report measured by running it in ONNX Runtime against the fp32
torch reference. exporters/pipeline.py runs the steps.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx
import torch

from edgetok.errors import EdgetokError
from edgetok.exporters import genai
from edgetok.exporters import onnx_rewrites as rewrites
from edgetok.exporters.allocate import Allocation, allocate, calibration_rounded
from edgetok.exporters.hf import write_model_files
from edgetok.exporters.onnx_graph import PruneSpec, build_decoder, default_prune, graph_inv_freq
from edgetok.exporters.options import AUTO, DEFAULT_BLOCK, ONNX_LADDER, QUANTIZED_WEIGHTS, SOURCE, OnnxOptions
from edgetok.exporters.quantize import QuantizedModel, QuantizedWeight, fit_group_size, rtn
from edgetok.exporters.sensitivity import Matrix
from edgetok.files import file_sha256, progress_bar
from edgetok.kernels import ort_ops
from edgetok.models.manifest import ONNX_DATA, ONNX_MANIFEST, ONNX_MODEL, OnnxManifest, SourceRecord
from edgetok.models.names import (
    DOWN_PROJ,
    EMBEDDING,
    GATE_UP_FUSED,
    HEAD_WEIGHTS,
    LM_HEAD,
    O_PROJ,
    QKV_FUSED,
    fused_parts,
    genai_io_names,
    io_names,
    layer,
)
from edgetok.models.sources import Source, load_source

HEAD_BLOCK = 32  # the 8-bit embedding / LM head: q8_0's block
# --activations float: the head's highest logits recomputed from float activations (the next token's
# near-ties are decided there, and the head's float kernel is too slow to run whole)
EXACT_TOP = 16


def weight_quantizer(weights: str, block_size: int | None, qdq: bool, zero_points: str = "exact",
                     head_bits: int = 8) -> rewrites.Quantizer:
    """How each weight is quantized (round to nearest).

    int4: linears at 4 bits in blocks along K; the embedding and LM head at head_bits, 8 by default
    (one tied matrix serves both, and it is the most sensitive: at 4 bits alone it costs SmolLM2
    ~20 % top-1), as llama.cpp's quantize keeps the output tensor at q8_0.
    int8: everything at 8 bits. block_size None: per output channel.
    Zero points are fractional (exact group minimum, zero_points="exact") for 4-bit MatMulNBits
    unless zero_points="integer" (onnxruntime-genai's choice: no offset nodes, less exact), and
    integers for 8 bits (ONNX Runtime's CPU kernel takes no fractional ones there) and under --qdq,
    where DequantizeLinear's zero point has the weights' integer type. MatMulNBits' scales and zero
    points are stored in fp16 (to_fp16), so codes are chosen against fp16-rounded scales.
    """
    bits = 4 if weights == "int4" else 8
    head_bits = head_bits if weights == "int4" else 8

    def quantize(name: str, w) -> QuantizedWeight:
        k = w.shape[1]
        scale_dtype = torch.float32 if qdq else torch.float16
        if name in HEAD_WEIGHTS:
            return rtn(w, head_bits, fit_group_size(k, HEAD_BLOCK), symmetric=True, scale_dtype=scale_dtype)
        if block_size is None:
            return rtn(w, bits, k, symmetric=True, scale_dtype=scale_dtype)
        float_zero = bits == 4 and not qdq and zero_points == "exact"
        return rtn(w, bits, fit_group_size(k, block_size), float_zero=float_zero, scale_dtype=scale_dtype)

    return quantize


def stored_bits(kind: str, head: bool, block: int) -> float:
    """Bits per weight of a matrix at `kind` as to_matmul_nbits and to_fp16 store it: the codes,
    an fp16 scale per block, and per block an fp16 offset (4-bit layers' exact zero points), an
    8-bit zero point (8-bit layers) or none (the symmetric embedding / head)."""
    if kind == "fp16":
        return 16.0
    bits = 4 if kind == "int4" else 8
    if head:
        return bits + 16 / HEAD_BLOCK
    return bits + (16 + (16 if bits == 4 else 8)) / block


def allocation_matrices(cfg, weights: dict[str, torch.Tensor]) -> list[Matrix]:
    """The graph's weight initializers (a fused linear stacks its parts), each int4, int8 or fp16."""
    matrices = []
    units = [EMBEDDING] + ([] if cfg.tie_word_embeddings else [LM_HEAD])
    units += [layer(i, f"{unit}.weight") for i in range(cfg.num_layers) for unit in (QKV_FUSED, O_PROJ, GATE_UP_FUSED, DOWN_PROJ)]
    for name in units:
        parts = tuple(fused_parts(name) or [name])
        matrices.append(Matrix(name, parts, sum(weights[p].numel() for p in parts), ONNX_LADDER))
    return matrices


def ladder_quantizers(block_size: int) -> dict[str, rewrites.Quantizer]:
    """--weights auto's quantized types, each as --weights TYPE rounds (the head too at int4)."""
    return {kind: weight_quantizer(kind, block_size, False, head_bits=4 if kind == "int4" else 8)
            for kind in QUANTIZED_WEIGHTS if kind not in (AUTO, SOURCE)}


def allocated_quantizer(types: dict[str, str], block_size: int) -> rewrites.Quantizer:
    """--weights auto: each initializer at the type the allocator chose (fp16: left float)."""
    quantizers = ladder_quantizers(block_size)
    return lambda name, w: None if types[name] == "fp16" else quantizers[types[name]](name, w)


def allocate_types(source: Source, options: OnnxOptions) -> Allocation:
    """--weights auto: every initializer's type for --target-bits or --max-kl (exporters/allocate.py)."""
    block = options.block_size
    matrices = allocation_matrices(source.config, source.weights)
    quantizers = ladder_quantizers(block)

    def round_trip(name: str, w: torch.Tensor, kind: str) -> torch.Tensor:
        return w.half().float() if kind == "fp16" else quantizers[kind](name, w).dequantize()

    return allocate(calibration_rounded(source, options), matrices, round_trip,
                    lambda m, kind: stored_bits(kind, m.name in HEAD_WEIGHTS, block),
                    target_bits=options.target_bits, max_kl=options.max_kl, progress=progress_bar("sensitivity"))


def calibrated_quantizer(qm: QuantizedModel, fallback: rewrites.Quantizer) -> rewrites.Quantizer:
    """gptq / rsq codes for the decoder linears (a fused linear stacks its parts' rows), and
    `fallback` for the rest (the embedding and head)."""
    codes = qm.quantized()

    def quantize(name: str, w: torch.Tensor) -> QuantizedWeight:
        parts = fused_parts(name) or [name]
        if all(p in codes for p in parts):
            qw = QuantizedWeight.cat_rows([codes[p] for p in parts])
            assert qw.shape == tuple(w.shape), (name, qw.shape, w.shape)
            return qw
        return fallback(name, w)

    return quantize


def source_quantizer(source: Source) -> tuple[rewrites.Quantizer, dict]:
    """--weights source: each matrix at its GGUF's own codes (exporters/gguf_codes.py; a fused linear
    stacks its parts on their common grid), and the type plan: which GGUF type became which
    MatMulNBits width, and the matrices whose type has no MatMulNBits form, rounded again to int8
    with the loss (‖Ŵ − W‖ / ‖W‖)."""
    from edgetok.exporters.gguf_codes import source_codes

    if source.format != "gguf":
        raise EdgetokError(f"--weights source carries a GGUF's own codes, and {source.ref} is not a GGUF file: "
                           "choose --weights int4, int8 or auto")
    codes, types = source_codes(source.path, source.config)
    fallback = weight_quantizer("int8", DEFAULT_BLOCK, qdq=False)
    plan: dict[str, int] = {}
    rounded: dict[str, str] = {}

    def quantize(name: str, w: torch.Tensor) -> QuantizedWeight:
        parts = fused_parts(name) or [name]
        if not all(p in codes for p in parts):
            qw = fallback(name, w)
            error = ((qw.dequantize() - w).norm() / w.norm().clamp_min(1e-30)).item()
            rounded[name] = {"type": "+".join(sorted({types.get(p, "?") for p in parts})), "relative_error": round(error, 6)}
            return qw
        qw = QuantizedWeight.cat_rows([codes[p] for p in parts])
        assert qw.shape == tuple(w.shape), (name, qw.shape, w.shape)
        key = f"{'+'.join(sorted({types[p] for p in parts}))} → int{qw.bits}"
        plan[key] = plan.get(key, 0) + 1
        return qw

    return quantize, {"method": "source codes", "plan": plan, "rounded_again": rounded}


def prune_spec(config, after_layer: int | None, attention: str) -> PruneSpec | None:
    """The graph's pruning point: none unless asked for (it slows decoding down: the layers from
    it on rotate their queries and keys outside GroupQueryAttention)."""
    if after_layer is None:
        return None
    spec = default_prune(config)
    if spec is None:
        raise EdgetokError("this model cannot prune prompts (it needs 2 layers or more)")
    if not 0 <= after_layer <= config.num_layers - 2:
        raise EdgetokError(f"--prune-after-layer must be between 0 and {config.num_layers - 2} for this model, not {after_layer}")
    spec = replace(spec, after_layer=after_layer)
    # sliding layers after the pruning point mask by the kept tokens' positions (onnx_graph.py)
    windows = config.graph_windows
    positioned = {windows[i] for i in spec.positioned_layers(windows)}
    if positioned and attention != "gqa":
        raise EdgetokError("a pruning point before sliding-window layers needs --attention gqa "
                           "(their windows count the kept tokens' positions through GroupQueryAttention's bias)")
    if len(positioned) > 1:
        raise EdgetokError(f"this model cannot prune prompts in ONNX after layer {after_layer}: "
                           f"its later sliding layers have different windows ({sorted(positioned)})")
    return spec


class OnnxExport:
    """One ONNX export (exporters/pipeline.py's FormatExport): a folder at options.output."""

    runtime = "onnxruntime (CPUExecutionProvider)"

    marker = ONNX_MANIFEST  # --force replaces a folder only if it holds one: an export

    def __init__(self, options: OnnxOptions) -> None:
        self.options = options
        self.outputs = [options.output]
        if options.genai:
            self.runtime = genai.runtime()

    def code_grid(self, source: Source) -> dict:
        o = self.options
        return {"bits": 4 if o.weights == "int4" else 8, "group_size": o.block_size or DEFAULT_BLOCK,
                "scale_dtype": torch.float32 if o.qdq else torch.float16}

    def prepare(self, source: Source, qm: QuantizedModel | None, tokens: list[int]) -> None:
        """The graph, its weights rewritten as the options say (gptq / rsq: from qm's codes and
        float weights, rotated ones for rsq)."""
        o = self.options
        self.config, self.float_weights, self.quantization = source.config, source.weights, {}
        self.allocation = allocate_types(source, o) if o.allocates else None
        if self.allocation is not None:
            quantizer = allocated_quantizer(self.allocation.types, o.block_size)
        elif o.weights == SOURCE:
            quantizer, self.quantization = source_quantizer(source)
        elif o.quantized:
            quantizer = weight_quantizer(o.weights, o.block_size, o.qdq, o.zero_points, o.head_bits)
        else:
            quantizer = None
        if qm is not None:
            quantizer = calibrated_quantizer(qm, quantizer)
            self.config, self.float_weights, self.quantization = qm.config, qm.reference, qm.info
        self.prune = prune_spec(self.config, o.prune_after_layer, o.attention)
        self.model = build_decoder(self.config, self.float_weights, o.opset, o.attention, self.prune)
        if o.weights == "fp16":
            rewrites.to_fp16(self.model)
        elif o.qdq:
            rewrites.to_qdq(self.model, quantizer)
        elif o.quantized:
            # Level 4: ONNX Runtime's integer kernels, int8 activations per block (ortgenai's default);
            # its float-activation kernels are many times slower on x86 (measured: 3× for 4-bit, 35×
            # for 8-bit). --qdq graphs run in float on CPU (see runtimes/backends/onnxruntime.py).
            # (the head keeps int8 activations: its float kernel is ~9× slower per token)
            # (--weights source: only its 4-bit matrices; ONNX Runtime has no fast float kernel for 8 bits)
            # (--genai: onnxruntime-genai cannot load edgetok's operators; exporters/genai.py says why)
            exact = o.activations == "float"
            rewrites.to_matmul_nbits(self.model, quantizer, frozenset({"linear"}) if exact else frozenset(),
                                     exact_top=EXACT_TOP if exact else 0, float_max_bits=4 if o.weights == SOURCE else 8,
                                     edgetok_ops=not o.genai)
            rewrites.to_fp16(self.model)  # the scales and zero points
            if exact and not o.genai and ort_ops.attention_available():  # the default engine's recipe: edgetok's own kernels
                rewrites.to_edgetok_attention(self.model)
        if o.genai:
            genai.to_genai_interface(self.model, self.config)

    def write(self, source: Source, paths: list[Path]) -> OnnxManifest:
        """The folder, with its manifest: the parity report loads it as a model."""
        (folder,) = paths
        o = self.options
        folder.mkdir()
        edgetok_ops = sorted({node.op_type for node in self.model.graph.node if node.domain == ort_ops.DOMAIN})
        onnx.save_model(self.model, folder / ONNX_MODEL, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=ONNX_DATA, size_threshold=1024)
        self.model = None  # the graph's copy of the weights: free it before the parity report
        source.tokenizer.save(folder)
        write_model_files(source, folder)
        if o.genai:
            genai.write_genai_config(folder, self.config, source.tokenizer)
        for f in folder.iterdir():
            f.chmod(0o644)  # onnx writes external data private
        graph = [folder / ONNX_MODEL, folder / ONNX_DATA]
        hashes = {f.name: file_sha256(f) for f in sorted(folder.iterdir())}  # the loader checks every file
        manifest = OnnxManifest(
            source=SourceRecord.of(source, beside=o.output, fingerprint=True),
            architecture=source.config.arch,
            config=self.config,
            weights=o.weights,
            method=o.method if o.quantized else None,
            quantization=self.quantization,
            block_size=o.block_size or (SOURCE if o.weights == SOURCE else "per-channel" if o.quantized else None),
            zero_points=o.zero_points if o.weights == "int4" and not o.qdq and o.method == "rtn" else None,
            head_bits=o.head_bits if o.weights == "int4" else None,
            activations=o.activations if o.quantized and not o.qdq else None,
            qdq=o.qdq,
            opset=o.opset,
            attention=o.attention,
            edgetok_ops=edgetok_ops,
            prune=self.prune,
            io=genai_io_names(source.config.num_layers) if o.genai else
            io_names(source.config.num_layers, self.prune is not None,
                     bool(self.prune and self.prune.positioned_layers(self.config.graph_windows))),
            genai=o.genai or None,
            rope_inv_freq=graph_inv_freq(self.config, self.float_weights).tolist(),
            files={"model": ONNX_MODEL, "data": ONNX_DATA},
            graph_sha256="".join(hashes[f.name][:32] for f in graph),
            sha256=hashes,
            size_bytes=sum(f.stat().st_size for f in graph),
            allocation=self.allocation.to_json() if self.allocation else None,
        )
        manifest.write(folder / ONNX_MANIFEST)
        return manifest

    def logits(self, paths: list[Path], tokens: list[int]) -> torch.Tensor:
        if self.options.genai:  # the parity report measures what onnxruntime-genai runs
            return genai.genai_logits(paths[0], tokens, self.options.threads)
        from edgetok.runtimes.backends.onnxruntime import onnx_logits

        return onnx_logits(load_source(str(paths[0])), tokens, self.options.threads)

    def finish(self, manifest: OnnxManifest, paths: list[Path], seconds: float) -> None:
        manifest.export_seconds = seconds
        manifest.write(paths[0] / ONNX_MANIFEST)
