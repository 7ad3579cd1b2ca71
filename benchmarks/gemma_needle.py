"""Needle retrieval with Gemma 3 270M (a base model: a plain-text question, no chat template) at
long contexts: full attention vs the tiered cache at a budget (its full-attention layers budgeted,
its sliding layers in their windows).

    .venv/bin/python benchmarks/gemma_needle.py --contexts 16384,32768 --depths 0.1,0.5,0.9 --budgets 25%,auto --json FILE
    .venv/bin/python benchmarks/gemma_needle.py ... --budgets 25% --prune 0.5 --no-full --no-budgets --json FILE

--prune KEEP adds the prompt pruned to KEEP after the default layer (runtimes/prune.py; the sliding
layers' windows count the kept tokens' positions) over the first budget's cache.

Each (context, depth) cell's rows replace that cell's rows in --json as soon as they are measured, so the
long grid can run in cells (one lock hold each: `--contexts 32768 --depths 0.5`); the table printed at the
end is of every row in the file.

A fact is planted at each depth of Paul Graham's essays; the question and an answer prefix end the
prompt; a hit is the answer's number in the 16-token greedy continuation. Both systems run the
torch backend in fp32 on the same token ids, prefilled in 512-token pieces.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kv_quality import run  # benchmarks/kv_quality.py
from needle import ANSWER, NEEDLE, QUESTION  # benchmarks/needle.py

import edgetok
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.kv import KVConfig
from edgetok.runtimes.prune import PrunePlan
from edgetok.texts import essays


def needle_text_prompt(tokenizer, context: int, depth: float) -> list[int]:
    """About `context` tokens: essays with NEEDLE at `depth`, then QUESTION and "Answer:"."""
    tail = f"\n\nQuestion: {QUESTION}\nAnswer: The secret passphrase for the vault is '"
    body = tokenizer.encode(essays(context * 6), add_special_tokens=False)[: context - 64]
    cut = int(len(body) * depth)
    text = tokenizer.decode(body[:cut]) + "\n" + NEEDLE + "\n" + tokenizer.decode(body[cut:]) + tail
    return tokenizer.encode(text)


def run_pruned(backend: TorchBackend, prompt: list[int], keep: float, new: int) -> tuple[list[int], dict]:
    """Greedy continuation after a prefill pruned after the default layer: token ids, cache stats."""
    cache = backend.new_cache()
    plan = PrunePlan.checked(keep, None, backend.config)
    logits = backend.prefill_pruned(prompt, cache, plan, 512).logits
    backend.end_prefill(cache)
    out = []
    for _ in range(new):
        out.append(int(logits.argmax()))
        logits = backend.forward([out[-1]], cache)[-1]
    stats = backend.cache_stats(cache)
    cache.close()
    return out, stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--contexts", default="16384,32768")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--budgets", default="25%", help="comma-separated --kv-budget values (25%%, auto)")
    ap.add_argument("--prune", type=float, default=None,
                    help="also: the prompt pruned to this fraction (--prune-prompt KEEP) over the first budget's cache")
    ap.add_argument("--no-full", action="store_true", help="leave full attention out (its rows are in --json already)")
    ap.add_argument("--no-budgets", action="store_true", help="leave the budgets out (only --prune)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model = edgetok.load(args.model, backend="torch")  # the fp32 reference (the default engine is an ONNX export)
    tok = model.tokenizer
    budgets = args.budgets.split(",")
    systems: dict[str, tuple[TorchBackend, float | None]] = {}
    if not args.no_full:
        systems["full attention"] = (TorchBackend(model.source), None)
    for budget in [] if args.no_budgets else budgets:
        systems[f"KV {budget}"] = (TorchBackend(model.source, kv=KVConfig(budget=budget)), None)
    if args.prune is not None:
        systems[f"KV {budgets[0]}, prompt pruned to {args.prune:g}"] = (
            TorchBackend(model.source, kv=KVConfig(budget=budgets[0])), args.prune)
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    for context in (int(c) for c in args.contexts.split(",")):
        for depth in (float(d) for d in args.depths.split(",")):
            prompt = needle_text_prompt(tok, context, depth)
            rows = [r for r in rows if (r["context"], r["depth"]) != (context, depth) or r["system"] not in systems]
            for name, (backend, keep) in systems.items():  # interleaved: each prompt on every system in turn
                start = time.perf_counter()
                if keep is None:
                    out, _, _, stats = run(backend, prompt, None, 16)
                else:
                    out, stats = run_pruned(backend, prompt, keep, 16)
                text = tok.decode(out)
                rows.append({"context": context, "prompt_tokens": len(prompt), "depth": depth, "system": name,
                             "hit": ANSWER in text, "answer": text, "seconds": round(time.perf_counter() - start, 1),
                             "budget_used": stats.get("budget_used")})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    names = list(dict.fromkeys(r["system"] for r in rows))
    print("| context | depth | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for context in sorted({r["context"] for r in rows}):
        for depth in sorted({r["depth"] for r in rows if r["context"] == context}):
            cells = [next((r for r in rows if (r["context"], r["depth"], r["system"]) == (context, depth, s)), None) for s in names]
            print(f"| {context} | {depth:.0%} | " + " | ".join("–" if c is None else f"{'hit' if c['hit'] else 'miss'} "
                                                             f"({c['answer'].strip()[:24]!r}, {c['seconds']} s)"
                                                             for c in cells) + " |")


if __name__ == "__main__":
    main()
