"""Size and parity of SmolLM2's ONNX exports, one row per weight format.

    .venv/bin/python benchmarks/onnx_quality.py [--model smollm2] [--out DIR]

Each row is `edgetok export MODEL --format onnx ...` (its parity report: the graph run by ONNX
Runtime on CPU against edgetok's fp32 torch reference, 1024 tokens of the built-in essays) and the
folder's size on disk. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

EDGETOK = str(Path(sys.executable).parent / "edgetok")
EXPORTS = [
    ("int4", []), ("int4", ["--zero-points", "integer", "--head-bits", "4"]), ("int8", []),
    ("int8", ["--qdq", "--block-size", "32"]), ("int8", ["--qdq"]), ("int4", ["--qdq"]), ("fp16", []),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", type=Path, default=None, help="keep the exports here (default: a temporary folder)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="edgetok-onnx-"))
    print("| --weights | options | form | folder MB | top-1 | perplexity (ref) | KL mean | max abs dlogit | export s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for weights, options in EXPORTS:
        folder = out / "-".join([weights, *[o.strip("-") for o in options]])
        cmd = [EDGETOK, "export", args.model, "--format", "onnx", "--weights", weights, *options, "-o", str(folder), "--force", "--json"]
        manifest = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        size = sum(f.stat().st_size for f in folder.iterdir())
        p = manifest["parity"]
        form = "QDQ" if "--qdq" in options else "MatMulNBits" if weights in ("int4", "int8") else "float"
        print(f"| {weights} | {' '.join(options) or '-'} | {form} | {size / 1e6:.1f} | {p['top1_agreement']:.1%} | "
              f"{p['perplexity']:.2f} ({p['perplexity_reference']:.2f}) | {p['kl_mean']:.4f} | {p['max_abs_dlogit']:.2f} | "
              f"{manifest['export_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
