"""The default engine's export: a model that is not an ONNX export is exported once, then run.

`edgetok run MODEL` runs an ONNX export on ONNX Runtime. A GGUF keeps its own codes
(`--weights source`: 4-bit codes in 4-bit MatMulNBits blocks with float activations, 5–8-bit codes
in 8-bit blocks with int8 activations, ONNX Runtime's only fast 8-bit kernel), so the export's
weights are the reference's: rounding a K-quant file's codes again onto a 4-bit grid cost Gemma 3
270M a quarter of its next tokens (BENCHMARKS.md). A float model (an HF folder) is rounded to int4
with float activations. It is built on first use into
$EDGETOK_HOME/exports/, one folder per source, exporter and options (the key hashes all three: new
weights or a new edgetok build anew). Two processes asking for the same export at once: one
builds, the other waits on a lock and uses it. An entry that fails its manifest's hashes is rebuilt,
never used; the pipeline writes whole folders or nothing (files.staged).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from edgetok import __version__
from edgetok.errors import EdgetokError
from edgetok.exporters.options import SOURCE, OnnxOptions
from edgetok.files import edgetok_home
from edgetok.models.sources import Source, load_source, require_torch


def default_options(source: Source) -> dict[str, str]:
    """What the default engine runs for `source`; the rest of OnnxOptions keeps its defaults."""
    return {"weights": SOURCE if source.format == "gguf" else "int4", "activations": "float"}


def exports_dir() -> Path:
    return edgetok_home() / "exports"


EXPORTER_MODULES = ("edgetok.exporters.onnx", "edgetok.exporters.onnx_graph", "edgetok.exporters.onnx_rewrites",
                    "edgetok.exporters.quantize", "edgetok.exporters.options", "edgetok.exporters.pipeline",
                    "edgetok.exporters.gguf_codes",
                    "edgetok.models.manifest", "edgetok.models.names")


def exporter_code() -> str:
    """The SHA-256 of the ONNX exporter's code: an export made by other code is never used as current.
    (The files are read, not imported: the exporter imports torch, and running the export does not.)"""
    files = [Path(importlib.util.find_spec(name).origin) for name in EXPORTER_MODULES]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def export_folder(source: Source) -> Path:
    """Where `source`'s default export lives: named for a reader, keyed for correctness."""
    options = asdict(OnnxOptions(model=source.ref, output=Path("."), **default_options(source)))
    basis = {"source": source.fingerprint, "edgetok": __version__, "exporter": exporter_code(),
             "options": {k: v for k, v in options.items() if k not in ("model", "output", "threads")}}
    key = hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.ref).name or "model")[:48]
    return exports_dir() / f"{name}-{key}"


def default_export(source: Source, threads: int | None = None, progress: bool = False) -> Source:
    """`source`'s default ONNX export, built first if it is missing or damaged → the export's Source."""
    folder = export_folder(source)
    with _locked(folder.with_name(f"{folder.name}.lock")):  # kept: a lock file is not a temporary
        if folder.is_dir():
            try:
                return load_source(str(folder))
            except EdgetokError:
                shutil.rmtree(folder, ignore_errors=True)  # damaged: rebuilt, never used
        require_torch(f"building the default export of {source.ref} (once)")
        from edgetok.exporters.pipeline import export

        if progress:
            print(f"edgetok: building the fast engine's export of {source.ref} (once) into {folder}", file=sys.stderr)
        export(OnnxOptions(model=str(source.path), output=folder, threads=threads, **default_options(source)))
        return load_source(str(folder))


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` for the block (the lock dies with its process: no stale locks)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except OSError as e:
        raise EdgetokError(f"cannot build the default export in {path.parent}: {e.strerror or e} "
                           "(set EDGETOK_HOME to a writable folder, or pass --backend torch)") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
