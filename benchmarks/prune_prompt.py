"""Prompt pruning: prefill speed, greedy agreement and needle retrieval, against no pruning.

    .venv/bin/python benchmarks/prune_prompt.py --contexts 4096,8000 --keeps 0.5,0.3 --layers 2,4,8 --repeat 2 --needle-layers 2,4

SmolLM2-135M-Instruct (fp32 torch backend, exact contiguous KV cache; or --model DIR, an ONNX
export, whose graph prunes after the layer it was exported with), prefill in 512-token chunks as
the engine does (a pruned ONNX prefill is one run of the graph). Speed: a real-text prompt (Paul Graham essays, no chat template),
prefill time of each configuration, rounds interleaved (none, pruned, pruned, ..., none, ...)
under /tmp/edgetok-bench.lock. Agreement: the unpruned model generates greedily; each pruned
prefill is then fed the same tokens (teacher forcing) and we count how often its argmax agrees,
and the mean KL(unpruned ‖ pruned). Needle: benchmarks/needle.py's fact at 10/50/90 % depth, the
question at the end (chat template), 24 greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from needle import found, needle_prompt  # benchmarks/needle.py

import edgetok
from edgetok.bench.lock import bench_lock
from edgetok.runtimes.prune import PrunePlan
from edgetok.texts import essays

CHUNK = 512



@torch.inference_mode()
def prefill(backend, prompt: list[int], plan: PrunePlan | None):
    """→ last logits (V,), the cache after end_prefill, (wall, CPU) seconds (as the engine prefills)."""
    cache = backend.new_cache()
    t, cpu = time.perf_counter(), time.process_time()
    if plan is None:
        for i in range(0, len(prompt), CHUNK):
            logits = backend.forward(prompt[i : i + CHUNK], cache)
    else:
        logits = backend.prefill_pruned(prompt, cache, plan, CHUNK).logits
    backend.end_prefill(cache)
    return logits, cache, (time.perf_counter() - t, time.process_time() - cpu)


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


def speed(backend, prompt: list[int], plans: list, repeat: int) -> list[dict]:
    """Prefill wall and CPU time per plan, rounds interleaved, under the benchmark lock."""
    ctx = len(prompt)
    wall = {name(p): [] for p in plans}
    cpu = {name(p): [] for p in plans}  # CPU seconds of this process (all threads)
    with bench_lock():
        for round_ in range(repeat):
            for plan in plans:
                _, cache, (seconds, cpu_s) = prefill(backend, prompt, plan)
                del cache
                wall[name(plan)].append(seconds)
                cpu[name(plan)].append(cpu_s)
                print(f"{ctx} round {round_ + 1} {name(plan)}: {ctx / seconds:.0f} tok/s, {cpu_s:.1f} CPU s", flush=True)
    base, base_cpu = statistics.median(wall["none"]), statistics.median(cpu["none"])
    rows = []
    for plan in plans:
        t, c = statistics.median(wall[name(plan)]), statistics.median(cpu[name(plan)])
        # Wall-clock speed is what a user sees; on a shared machine the CPU time this process
        # spent is the steadier measure of the work saved.
        rows.append({"context": ctx, "prune": name(plan), "prefill_tok_s": round(ctx / t, 1),
                     "prefill_s_min_max": [round(min(wall[name(plan)]), 2), round(max(wall[name(plan)]), 2)],
                     "speedup": round(base / t, 2), "cpu_s": round(c, 2), "cpu_speedup": round(base_cpu / c, 2)})
    return rows


def agreement(backend, prompt: list[int], plans: list, new_tokens: int) -> list[dict]:
    """Teacher-forced greedy agreement and KL of each pruned prefill against the unpruned one."""
    logits, cache, _ = prefill(backend, prompt, None)
    ref_tokens, ref_logits = continue_(backend, cache, logits, new_tokens)
    del cache
    p = ref_logits.log_softmax(-1)
    rows = []
    for plan in plans[1:]:
        logits, cache, _ = prefill(backend, prompt, plan)
        _, got = continue_(backend, cache, logits, new_tokens, follow=ref_tokens)
        del cache
        rows.append({"context": len(prompt), "prune": name(plan),
                     "greedy_agreement": round((got.argmax(-1) == torch.tensor(ref_tokens)).float().mean().item(), 4),
                     "kl_mean": round((p.exp() * (p - got.log_softmax(-1))).sum(-1).mean().item(), 5)})
    return rows


def needle(model, ctx: int, depth: float, plans: list) -> dict:
    backend, prompt = model.engine.backend, needle_prompt(model, ctx, depth)
    hits = {}
    for plan in plans:
        logits, cache, _ = prefill(backend, prompt, plan)
        hits[name(plan)] = found(model, continue_(backend, cache, logits, 24)[0])
        del cache
    return {"context": ctx, "needle_depth": depth, "found": hits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,8000")
    ap.add_argument("--keeps", default="0.5,0.3")
    ap.add_argument("--layers", default="2,4,8", help="prune after each of these layers")
    ap.add_argument("--parts", default="speed,agreement,needle")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32, help="teacher-forced tokens for greedy agreement")
    ap.add_argument("--needle-depths", default="0.1,0.5,0.9")
    ap.add_argument("--needle-layers", default=None, help="needle runs only for these layers (default: all of --layers)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads; 1 makes the CPU time a steady measure of work on a busy machine")
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default="smollm2", help="what edgetok run takes; an ONNX export prunes inside its graph")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = edgetok.load(args.model, threads=args.threads)
    backend, cfg = model.engine.backend, model.config
    plans = [None] + [PrunePlan.checked(float(k), int(layer), cfg)
                      for layer in args.layers.split(",") for k in args.keeps.split(",")]
    needle_layers = args.needle_layers.split(",") if args.needle_layers else args.layers.split(",")
    needle_plans = [p for p in plans if p is None or str(p.after_layer) in needle_layers]
    text_ids = model.tokenizer.encode(essays(200_000), add_special_tokens=False)
    parts = args.parts.split(",")
    results = []

    def emit(rows: list[dict]) -> None:
        for row in rows:
            results.append(row)
            print(json.dumps(row), flush=True)
        if args.out:  # rewritten as results arrive: a long run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)

    for ctx in map(int, args.contexts.split(",")):
        if "speed" in parts:
            emit(speed(backend, text_ids[:ctx], plans, args.repeat))
        if "agreement" in parts:
            emit(agreement(backend, text_ids[:ctx], plans, args.new_tokens))
        if "needle" in parts:
            for depth in map(float, args.needle_depths.split(",")):
                emit([needle(model, ctx, depth, needle_plans)])


if __name__ == "__main__":
    main()
