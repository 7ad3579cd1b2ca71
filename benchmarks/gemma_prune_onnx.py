"""Prompt pruning inside the ONNX graph on Gemma 3 270M: the planted needle, and the prefill speed-up.

    .venv/bin/python benchmarks/gemma_prune_onnx.py --plain DIR --pruning DIR --contexts 8192 --keep 0.5 --json FILE

DIR: `edgetok export gemma3-270m --format onnx --weights int8 [--prune-after-layer 2] --no-verify -o DIR`
(int8: Gemma's 4-bit exports lose a quarter of the next tokens, see "Gemma 3 export quality").
Three systems on the same token ids, interleaved per prompt, ONNX Runtime on --threads threads, exact
KV cache: the plain export prefilled in 512-token pieces (the engine's prefill), the pruning export
prefilled the same way (what its pruning point costs when it does not prune), and the pruning export's
pruned prefill (one graph run: layers 0..2 on every token, the later ones on the KEEP fraction at
their own positions; the later sliding layers' windows count positions). The prompt is
gemma_needle.py's: a passphrase at each depth of the essays, a plain-text question (a base model); a
hit is the number in the 16-token greedy continuation. One benchmark-lock hold per (context, depth).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gemma_needle import needle_text_prompt  # benchmarks/gemma_needle.py
from needle import ANSWER  # benchmarks/needle.py
from prune_prompt import prefill  # benchmarks/prune_prompt.py

from edgetok.bench.lock import bench_lock
from edgetok.models.sources import load_source
from edgetok.runtimes.backends.onnxruntime import OnnxBackend
from edgetok.runtimes.prune import PrunePlan


def greedy(backend, cache, logits, new: int) -> tuple[list[int], float]:
    """new greedy tokens after a prefill → tokens, decode seconds."""
    out, t = [], time.perf_counter()
    for _ in range(new):
        out.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
        logits = backend.forward([out[-1]], cache)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", type=Path, required=True, help="an ONNX export without a pruning point")
    ap.add_argument("--pruning", type=Path, required=True, help="the same export with --prune-after-layer")
    ap.add_argument("--contexts", default="8192")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    plain_src, pruning_src = load_source(str(args.plain)), load_source(str(args.pruning))
    plain, pruning = OnnxBackend(plain_src, threads=args.threads), OnnxBackend(pruning_src, threads=args.threads)
    plan = PrunePlan.checked(args.keep, pruning.prune_after_layer, pruning.config)
    tok = plain_src.tokenizer
    systems = {"plain export, full prompt": (plain, None), "pruning export, full prompt": (pruning, None),
               f"pruning export, KEEP {args.keep:g} after layer {plan.after_layer}": (pruning, plan)}
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    for context in (int(c) for c in args.contexts.split(",")):
        for depth in (float(d) for d in args.depths.split(",")):
            prompt = needle_text_prompt(tok, context, depth)
            rows = [r for r in rows if (r["context"], r["depth"]) != (context, depth)]
            with bench_lock():
                for name, (backend, p) in systems.items():
                    logits, cache, (wall, cpu) = prefill(backend, prompt, p)
                    out, decode_s = greedy(backend, cache, logits, 16)
                    text = tok.decode(out)
                    rows.append({"context": context, "prompt_tokens": len(prompt), "depth": depth, "system": name,
                                 "hit": ANSWER in text, "answer": text, "prefill_s": round(wall, 2),
                                 "prefill_cpu_s": round(cpu, 2), "decode_tok_s": round(16 / decode_s, 1),
                                 "layer_tokens": cache.lengths[-1], "threads": args.threads})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                    del cache
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    names = list(systems)
    base = names[0]
    print("| context | depth | " + " | ".join(names) + " | prefill × (plain ÷ pruned) |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for context in sorted({r["context"] for r in rows}):
        for depth in sorted({r["depth"] for r in rows if r["context"] == context}):
            cells = {r["system"]: r for r in rows if (r["context"], r["depth"]) == (context, depth)}
            line = " | ".join(f"{'hit' if c['hit'] else 'miss'}, prefill {c['prefill_s']} s ({c['prefill_cpu_s']} CPU s)"
                              for c in (cells[s] for s in names))
            print(f"| {context} | {depth:.0%} | {line} | {cells[base]['prefill_s'] / cells[names[-1]]['prefill_s']:.2f} |")


if __name__ == "__main__":
    main()
