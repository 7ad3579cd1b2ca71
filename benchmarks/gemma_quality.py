"""Export quality of Gemma 3 270M per format, on several kinds of real text.

    .venv/bin/python benchmarks/gemma_quality.py [--out bench-out/gemma] [--tokens 512] [--json FILE] [--only NAME,...]

Every artifact is `edgetok export gemma3-270m ...` (GGUF files run by llama.cpp, ONNX folders by
ONNX Runtime on CPU); the reference is edgetok's fp32 torch model on the dequantized Q4_K_M weights.
The published Q4_K_M file itself is measured the same way (llama.cpp on it vs the fp32 reference
of its own weights: what llama.cpp's kernels cost). Texts: the seven kinds of edgetok/texts.py
(essays, legal, code, changelog, docs, structured, dialogue) — `--tokens` tokens of each. Prints a
Markdown table per text and the mean.

`--only` measures some artifacts (their names, as in the table) and merges their rows into --json,
so the grid can run in cells, one lock hold each; the tables printed are of every row in the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from edgetok.exporters.default import default_export
from edgetok.exporters.verify import compare, reference_logits
from edgetok.models.sources import load_source
from edgetok.runtimes.backends.llamacpp import llamacpp_logits
from edgetok.runtimes.backends.onnxruntime import onnx_logits
from edgetok.texts import KINDS, corpus

PUBLISHED = "Q4_K_M (the published file)"
DEFAULT = "the default engine's export"  # exporters/default.py: what `edgetok run gemma3-270m` runs
EDGETOK = [sys.executable, "-c", "import sys; from edgetok.cli import main; sys.argv[0] = 'edgetok'; main()"]
EXPORTS = [
    ("gguf", ["--quant", "q8_0"]), ("gguf", ["--quant", "q4_0"]),
    ("onnx", ["--weights", "fp16"]), ("onnx", ["--weights", "int8"]), ("onnx", ["--weights", "int4"]),
    ("onnx", ["--weights", "int8", "--qdq"]), ("onnx", ["--weights", "int4", "--qdq"]),
    ("onnx", ["--weights", "source"]), ("onnx", ["--weights", "source", "--activations", "float"]),
]


def name_of(fmt: str, options: list[str]) -> str:
    return "-".join([fmt, *[o.strip("-") for o in options if o not in ("--quant", "--weights")]])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--out", type=Path, default=Path("bench-out/gemma"))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here (merged with its rows)")
    ap.add_argument("--only", default=None,
                    help="comma-separated artifact names (gguf-q8_0, onnx-int4-qdq, published, default)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    only = None if args.only is None else set(args.only.split(","))
    aliases = {PUBLISHED: "published", DEFAULT: "default"}
    wanted = lambda name: only is None or name in only or aliases.get(name) in only  # noqa: E731
    src = load_source(args.model)  # the fp32 reference's source (edgetok.load defaults to an ONNX export)
    # ~8 characters a token is more than enough text for every kind
    samples = {kind: src.tokenizer.encode(corpus(kind, 8 * args.tokens))[: args.tokens] for kind in KINDS}
    reference = {kind: reference_logits(src, tokens) for kind, tokens in samples.items()}

    artifacts: list[tuple[str, Path, float]] = [(PUBLISHED, src.path, 0.0)] if wanted(PUBLISHED) else []
    if wanted(DEFAULT):  # built once (or found) under $EDGETOK_HOME/exports
        artifacts.append((DEFAULT, default_export(src, args.threads).path, float("nan")))
    for fmt, options in EXPORTS:
        name = name_of(fmt, options)
        if not wanted(name):
            continue
        path = args.out / (f"{name}.gguf" if fmt == "gguf" else name)
        if not path.exists():
            start = time.perf_counter()
            cmd = [*EDGETOK, "export", args.model, "--format", fmt, *options, "-o", str(path), "--no-verify"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{name}: export failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
                continue
            artifacts.append((name, path, time.perf_counter() - start))
        else:
            artifacts.append((name, path, float("nan")))

    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    rows = [r for r in rows if r["artifact"] not in {a[0] for a in artifacts}]
    for name, path, seconds in artifacts:
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())
        for kind, tokens in samples.items():
            if path.suffix == ".gguf":
                logits = llamacpp_logits(path, tokens, args.threads)
            else:
                logits = onnx_logits(load_source(str(path)), tokens, args.threads)
            p = compare(reference[kind], logits, tokens).to_dict()
            export_s = round(seconds, 1) if seconds == seconds else None  # (NaN: exported by an earlier run)
            rows.append({"artifact": name, "text": kind, "size_mb": round(size / 1e6, 1), "export_s": export_s, **p})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    print("| artifact | size MB | text | top-1 | perplexity (fp32 ref) | KL mean | max abs Δlogit |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['artifact']} | {r['size_mb']} | {r['text']} | {r['top1_agreement']:.1%} | {r['perplexity']:.3f} "
              f"({r['perplexity_reference']:.3f}) | {r['kl_mean']:.4f} | {r['max_abs_dlogit']:.2f} |")
    print("\nMean over the texts:\n")
    print("| artifact | top-1 | KL mean | perplexity ÷ reference |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(r["artifact"] for r in rows):
        mine = [r for r in rows if r["artifact"] == name]
        top1 = sum(r["top1_agreement"] for r in mine) / len(mine)
        kl = sum(r["kl_mean"] for r in mine) / len(mine)
        ratio = sum(r["perplexity"] / r["perplexity_reference"] for r in mine) / len(mine)
        print(f"| {name} | {top1:.1%} | {kl:.4f} | {ratio:.4f} |")


if __name__ == "__main__":
    main()
