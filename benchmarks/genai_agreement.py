"""onnxruntime-genai running edgetok's --genai export: its greedy tokens against edgetok's, and its
parity against edgetok's fp32 reference beside onnxruntime-genai's own model builder's folder.

    .venv/bin/python benchmarks/genai_agreement.py [--model smollm2] [--new-tokens 32] [--out DIR]

For each --activations (int8, float): `edgetok export MODEL --format onnx` twice, without and with
--genai. Greedy: chat prompts run by `edgetok run` on the first and by onnxruntime-genai on the
second; the tokens up to the first difference are counted as agreeing. Parity: every folder run by
onnxruntime-genai on the export's parity text (1024 tokens of the built-in essays), the builder's
int4 folder (bench/artifacts.py: ortgenai_folder) too. No timing: prints a Markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

EDGETOK = str(Path(sys.executable).parent / "edgetok")
PROMPTS = ["What is the capital of France? Answer in one sentence.", "Write a haiku about the sea.",
           "Explain what a hash table is to a child.", "List three uses of copper."]


def main() -> None:
    import edgetok
    from edgetok.bench.artifacts import ortgenai_folder
    from edgetok.exporters.genai import genai_greedy, genai_logits
    from edgetok.exporters.options import OnnxOptions
    from edgetok.exporters.pipeline import evaluation_tokens
    from edgetok.exporters.verify import compare, reference_logits
    from edgetok.models.sources import load_source

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="keep the exports here (default: a temporary folder)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="edgetok-genai-"))
    source = load_source(args.model)
    tokens = evaluation_tokens(source, OnnxOptions(model=args.model, output=out / "unused"))
    reference = reference_logits(source, tokens)
    builder = ortgenai_folder(args.model, source)
    rows = [("onnxruntime-genai's builder, int4", "-", compare(reference, genai_logits(builder, tokens), tokens))]
    for activations in ("int8", "float"):
        plain, genai = out / f"plain-{activations}", out / f"genai-{activations}"
        for folder, extra in ((plain, ["--no-verify"]), (genai, ["--genai", "--no-verify"])):
            subprocess.run([EDGETOK, "export", args.model, "--format", "onnx", "--activations", activations,
                            "-o", str(folder), "--force", *extra], check=True, capture_output=True)
        model = edgetok.load(str(plain))
        agreed = total = 0
        for prompt in PROMPTS:
            want = model.generate(prompt, chat=True, max_new_tokens=args.new_tokens).tokens
            got = genai_greedy(genai, model.encode(prompt, chat=True), args.new_tokens)
            agreed += next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            total += max(len(want), len(got))
        rows.append((f"edgetok --genai int4, --activations {activations}", f"{agreed}/{total}",
                     compare(reference, genai_logits(genai, tokens), tokens)))
    print(f"| folder run by onnxruntime-genai | greedy tokens = edgetok's ({len(PROMPTS)} chat prompts) "
          f"| top-1 vs fp32 | perplexity (ref) | KL mean |")
    print("|---|---|---|---|---|")
    for name, greedy, r in rows:
        print(f"| {name} | {greedy} | {r.top1_agreement:.1%} | {r.perplexity:.3f} ({r.perplexity_reference:.3f}) | {r.kl_mean:.4f} |")


if __name__ == "__main__":
    main()
