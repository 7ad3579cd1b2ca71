"""Quality of the tiered KV cache under a budget, against full attention, on real text.

    .venv/bin/python benchmarks/kv_quality.py --contexts 4096,8000 --budgets 25%,50% --new-tokens 128

For each real-text prompt (Paul Graham essays): full attention generates greedily; the budgeted
cache is then fed the same tokens (teacher forcing), and we report how often its argmax agrees
and the mean KL(full ‖ budgeted) of the next-token distributions. Needle retrieval: a fact planted
at 10/50/90 % depth, the question at the end; a hit is the answer in the greedy continuation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from needle import found, needle_prompt  # benchmarks/needle.py

import edgetok
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.kv import KVConfig
from edgetok.texts import essays


def run(backend: TorchBackend, prompt: list[int], follow: list[int] | None, new: int):
    """Greedy continuation (or teacher-forced along `follow`): token ids, logits (new, V), decode s."""
    cache = backend.new_cache()
    logits = None
    for i in range(0, len(prompt), 512):
        logits = backend.forward(prompt[i : i + 512], cache)
    backend.end_prefill(cache)
    out, rows = [], []
    t = time.perf_counter()
    for step in range(new):
        rows.append(logits)
        tok = int(logits.argmax()) if follow is None else follow[step]
        out.append(tok)
        if step < new - 1:
            logits = backend.forward([tok], cache)
    elapsed = time.perf_counter() - t
    stats = backend.cache_stats(cache)
    if hasattr(cache, "close"):
        cache.close()
    return out, torch.stack([torch.as_tensor(r).reshape(-1) for r in rows]), elapsed, stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,8000")
    ap.add_argument("--budgets", default="25%")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--needle-depths", default="0.1,0.5,0.9")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiers", default=None, help="DEVICE_MB,HOST_MB: also run the budget squeezed into these tiers over disk")
    args = ap.parse_args()
    model = edgetok.load("smollm2")
    source = model.source
    full = TorchBackend(source)
    results = []
    text_ids = model.tokenizer.encode(essays(200_000))
    for ctx in map(int, args.contexts.split(",")):
        prompt = text_ids[:ctx]
        ref_tokens, ref_logits, ref_s, _ = run(full, prompt, None, args.new_tokens)
        configs = [(budget, {}) for budget in args.budgets.split(",")]
        if args.tiers:
            device_mb, host_mb = map(float, args.tiers.split(","))
            disk = tempfile.mkdtemp(prefix="edgetok-kv-")
            configs += [(budget, dict(device_mb=device_mb, host_mb=host_mb, disk_dir=disk)) for budget in args.budgets.split(",")]
        for budget, tiers in configs:
            b = TorchBackend(source, kv=KVConfig(budget=budget, **tiers))
            b.model = full.model  # same weights, no second copy
            _, logits, s, stats = run(b, prompt, ref_tokens, args.new_tokens)
            agree = (logits.argmax(-1) == torch.tensor(ref_tokens)).float().mean().item()
            p = ref_logits.log_softmax(-1)
            kl = (p.exp() * (p - logits.log_softmax(-1))).sum(-1).mean().item()
            row = {"context": ctx, "budget": budget, "tiers": args.tiers if tiers else "RAM",
                   "greedy_agreement": round(agree, 4), "kl_mean": round(kl, 5),
                   "decode_tok_s": round(args.new_tokens / s, 2), "full_decode_tok_s": round(args.new_tokens / ref_s, 2),
                   "budget_used": stats["budget_used"], "chunk_sizes": stats["chunk_sizes"]}
            results.append(row)
            print(json.dumps(row), flush=True)
        for depth in map(float, args.needle_depths.split(",")):
            prompt_n = needle_prompt(model, ctx, depth)
            hits = {}
            for budget in ["100%"] + args.budgets.split(","):
                b = TorchBackend(source, kv=KVConfig(budget=budget)) if budget != "100%" else full
                b.model = full.model
                toks, *_ = run(b, prompt_n, None, 24)
                hits[budget] = found(model, toks)
            row = {"context": ctx, "needle_depth": depth, "found": hits}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
