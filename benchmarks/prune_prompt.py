"""Prompt pruning: prefill speed, greedy agreement and needle retrieval, against no pruning.

    .venv/bin/python benchmarks/prune_prompt.py --contexts 4096,8000 --keeps 0.5,0.3 --layers 2,4,8 --repeat 2

SmolLM2-135M-Instruct (fp32 torch backend, exact contiguous KV cache), prefill in 512-token
chunks as the engine does. Speed: a real-text prompt (Paul Graham essays, no chat template),
prefill time of each configuration, rounds interleaved (none, pruned, pruned, ..., none, ...)
under /tmp/edgetok-bench.lock. Agreement: the unpruned model generates greedily; each pruned
prefill is then fed the same tokens (teacher forcing) and we count how often its argmax agrees,
and the mean KL(unpruned ‖ pruned). Needle: benchmarks/needle.py's fact at 10/50/90 % depth, the
question at the end (chat template), 24 greedy tokens.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import time
from contextlib import contextmanager

import torch

import edgetok
from edgetok.runtimes.prune import PrunePlan
from edgetok.texts import essays
from needle import found, needle_prompt  # benchmarks/needle.py

CHUNK = 512


@contextmanager
def bench_lock():
    """The machine is shared: timings run while no other benchmark does."""
    with open("/tmp/edgetok-bench.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@torch.inference_mode()
def prefill(backend, prompt: list[int], plan: PrunePlan | None):
    """→ last logits (V,), the cache after end_prefill, seconds (as the engine prefills)."""
    cache = backend.new_cache()
    t = time.perf_counter()
    if plan is None:
        for i in range(0, len(prompt), CHUNK):
            logits = backend.forward(prompt[i : i + CHUNK], cache)
    else:
        logits = backend.prefill_pruned(prompt, cache, plan, CHUNK).logits
    backend.end_prefill(cache)
    return logits, cache, time.perf_counter() - t


def continue_(backend, cache, logits, steps: int, follow: list[int] | None = None):
    """Greedy steps (or teacher-forced along `follow`) → tokens, logits (steps, V)."""
    tokens, rows = [], []
    for s in range(steps):
        rows.append(logits)
        tokens.append(int(logits.argmax()) if follow is None else follow[s])
        if s < steps - 1:
            logits = backend.forward([tokens[-1]], cache)
    return tokens, torch.stack(rows)


def name(plan: PrunePlan | None) -> str:
    return "none" if plan is None else f"keep {plan.keep} after layer {plan.after_layer}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,8000")
    ap.add_argument("--keeps", default="0.5,0.3")
    ap.add_argument("--layers", default="2,4,8", help="prune after each of these layers")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32, help="teacher-forced tokens for greedy agreement")
    ap.add_argument("--needle-depths", default="0.1,0.5,0.9")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model = edgetok.load("smollm2")
    backend, cfg = model.engine.backend, model.config
    plans = [None] + [PrunePlan.checked(float(k), int(layer), cfg)
                      for layer in args.layers.split(",") for k in args.keeps.split(",")]
    text_ids = model.tokenizer.encode(essays(200_000), add_special_tokens=False)
    results = []
    for ctx in map(int, args.contexts.split(",")):
        prompt = text_ids[:ctx]
        times = {name(p): [] for p in plans}
        quality = {}
        with bench_lock():
            for round_ in range(args.repeat):
                for plan in plans:
                    logits, cache, seconds = prefill(backend, prompt, plan)
                    times[name(plan)].append(seconds)
                    if round_ == 0 and plan is None:
                        ref_tokens, ref_logits = continue_(backend, cache, logits, args.new_tokens)
                    elif round_ == 0:
                        _, rows = continue_(backend, cache, logits, args.new_tokens, follow=ref_tokens)
                        p = ref_logits.log_softmax(-1)
                        quality[name(plan)] = {
                            "greedy_agreement": round((rows.argmax(-1) == torch.tensor(ref_tokens)).float().mean().item(), 4),
                            "kl_mean": round((p.exp() * (p - rows.log_softmax(-1))).sum(-1).mean().item(), 5),
                        }
                    del cache
                    print(f"{ctx} round {round_ + 1} {name(plan)}: {ctx / seconds:.0f} tok/s", flush=True)
        base = statistics.median(times["none"])
        for plan in plans:
            t = statistics.median(times[name(plan)])
            row = {"context": ctx, "prune": name(plan), "prefill_tok_s": round(ctx / t, 1),
                   "prefill_s_min_max": [round(min(times[name(plan)]), 2), round(max(times[name(plan)]), 2)],
                   "speedup": round(base / t, 2)} | quality.get(name(plan), {})
            results.append(row)
            print(json.dumps(row), flush=True)
        for depth in map(float, args.needle_depths.split(",")):
            prompt_n = needle_prompt(model, ctx, depth)
            hits = {}
            for plan in plans:
                logits, cache, _ = prefill(backend, prompt_n, plan)
                hits[name(plan)] = found(model, continue_(backend, cache, logits, 24)[0])
                del cache
            row = {"context": ctx, "needle_depth": depth, "found": hits}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
