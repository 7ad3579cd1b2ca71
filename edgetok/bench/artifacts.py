"""The model files peers run, built once from the bench's model and cached.

Under $EDGETOK_HOME/bench/<model fingerprint>/ (as sources.py caches converted GGUFs): the HF
folder (`edgetok export MODEL --format hf`, for transformers, the ONNX model builder and optimum),
the model builder's int4 output for onnxruntime-genai, optimum's fp32 ONNX export (each keyed by
its tool's version), and a GGUF for llama.cpp when the model is not one already. A second bench
reuses them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgetok.bench import optimum_env
from edgetok.errors import EdgetokError
from edgetok.files import temporary_folder
from edgetok.models.sources import Source, edgetok_home

GGUF_QUANT = "q8_0"  # for a model that is not a GGUF: edgetok export's default type


def edgetok_command() -> list[str]:
    """The `edgetok` of this interpreter's environment."""
    script = Path(sys.executable).parent / "edgetok"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from edgetok.cli import main; main()"]


def cache_dir(source: Source) -> Path:
    return edgetok_home() / "bench" / source.fingerprint[:24]


def _run(cmd: list[str], what: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        raise EdgetokError(f"could not build {what}: {lines[-1] if lines else 'exit status ' + str(p.returncode)}")


def hf_folder(model: str, source: Source) -> Path:
    out = cache_dir(source) / "hf"
    if not (out / "config.json").is_file():
        _run(edgetok_command() + ["export", model, "--format", "hf", "-o", str(out), "--force"], f"the HF folder of {model}")
    return out


def gguf_file(model: str, source: Source) -> Path:
    if source.format == "gguf":
        return source.path
    out = cache_dir(source) / f"model-{GGUF_QUANT}.gguf"
    if not out.is_file():
        _run(edgetok_command() + ["export", model, "--format", "gguf", "--quant", GGUF_QUANT, "-o", str(out),
                                  "--no-verify", "--force"], f"a GGUF of {model}")
    return out


def onnx_folder(model: str, source: Source, spec: str) -> Path:
    """edgetok's own ONNX export of the model: `edgetok export MODEL --format onnx --weights W
    [OPTIONS]` for spec "W [OPTIONS]", keyed by the exporter's code and the options, so a changed
    graph is never measured stale; the export writes a temporary folder and renames it."""
    import hashlib
    import shlex

    from edgetok.exporters.default import exporter_code
    from edgetok.models import manifest

    weights, *options = shlex.split(spec)
    code = hashlib.sha256(exporter_code().encode())
    code.update(shlex.join(options).encode())
    out = cache_dir(source) / f"onnx-{code.hexdigest()[:16]}-{weights}"
    if not (out / manifest.ONNX_MANIFEST).is_file():
        _run([*edgetok_command(), "export", model, "--format", "onnx", "--weights", weights, *options,
              "--no-verify", "--force", "-o", str(out)], f"the ONNX export of {model} ({spec})")
    return out


def ortgenai_folder(model: str, source: Source) -> Path:
    """`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4 -e cpu`, built beside
    the entry and renamed into place, so a half-built model is never used."""
    from importlib.metadata import version

    out = cache_dir(source) / f"ortgenai-{version('onnxruntime-genai')}-int4-cpu"
    if (out / "genai_config.json").is_file():
        return out
    hf = hf_folder(model, source)
    with temporary_folder(out) as tmp:  # (a killed bench's temporaries go with the next build)
        _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp / "model"),
              "-p", "int4", "-e", "cpu", "-c", str(tmp / "hf-cache")], f"the onnxruntime-genai model of {model}")
        (tmp / "model").rename(out)
    return out


def optimum_folder(model: str, source: Source) -> Path:
    """optimum's own export of the HF folder, fp32 (`python -m optimum.exporters.onnx --task
    text-generation-with-past`), run in optimum-onnx's environment (optimum_env.py), built beside
    the entry and renamed into place."""
    out = cache_dir(source) / f"optimum-{optimum_env.version()}-fp32"
    if (out / "model.onnx").is_file():
        return out
    hf = hf_folder(model, source)
    with temporary_folder(out) as tmp:
        _run([str(optimum_env.python()), "-m", "optimum.exporters.onnx", "--model", str(hf), "--task",
              "text-generation-with-past", str(tmp / "model")], f"optimum's ONNX export of {model}")
        (tmp / "model").rename(out)
    return out
