"""What speculative decoding can earn on an engine, measured before choosing how to draft:

1. the cost of one forward of k = 1, 2, 4, 8, 16, 32 tokens after a 1K-token prompt (what verifying
   a draft of k − 1 tokens costs against a plain decode step);
2. plain greedy decoding of benchmarks/speculative.py's prompt sets (input-grounded, open chat);
3. a replay of the drafters (edgetok's own PromptLookup, TokenRecycling and DraftControl) against
   those plain tokens at --draft-max 8 / 16 / 32: drafted, accepted, mean accepted length, and the
   speed-up the measured cost curve predicts; and, for the tree question, lookup's several
   matches verified together (the best branch accepted, a forward of 1 + the tree's nodes).

    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/speculative_costs.py \\
        --out benchmarks/results/speculative_costs.json            # the default engine, ~2 min
    ... benchmarks/speculative_costs.py --engine torch --out ...   # torch fp32

The replay assumes greedy exactness (a draft is accepted up to the first token that differs from
plain decoding's) and feeds TokenRecycling the rows of the accepted tokens only (the engine also
feeds it the rows after rejected ones: a little more to learn from). Each generation starts with a
cold drafter, as a new conversation would.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import edgetok
from edgetok.runtimes.speculation import DraftControl, PromptLookup, TokenRecycling

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speculative import OPEN, emit, grounded_prompts  # noqa: E402  (the same prompts as the speed benchmark)

WIDTHS = (1, 2, 4, 8, 16, 32)  # tokens per forward


def forward_costs(model: edgetok.Model, context: int, repeat: int) -> dict[int, float]:
    """Median seconds of a forward of k tokens after `context` tokens (rolled back after each)."""
    backend = model.engine.backend
    ids = [int(x) for x in np.random.default_rng(0).integers(100, model.config.vocab_size - 100, context)]
    cache = backend.new_cache()
    for a in range(0, context, 512):
        backend.forward(ids[a : a + 512], cache)
    backend.end_prefill(cache)
    times: dict[int, list[float]] = {k: [] for k in WIDTHS}
    for _ in range(repeat):  # interleaved: drift hits every width alike
        for k in WIDTHS:
            t = time.perf_counter()
            backend.forward(ids[:k], cache, last=k)
            times[k].append(time.perf_counter() - t)
            backend.truncate(cache, context)
    return {k: statistics.median(ts) for k, ts in times.items()}


def plain_runs(model: edgetok.Model, new_tokens: int, context: int) -> list[dict]:
    """Greedy generations of every prompt: prompt ids and generated ids (EOS included)."""
    from edgetok.runtimes.engine import GenerationConfig

    tok = model.tokenizer
    runs = []
    for set_name, prompts in {"input-grounded": grounded_prompts(tok, context), "open": OPEN}.items():
        for p in prompts:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            model.engine.reset()
            *_, result = model.engine.generate_ids(ids, GenerationConfig(max_new_tokens=new_tokens))
            tokens = result.tokens + ([tok.eos_ids[0]] if result.finish_reason == "eos" else [])
            runs.append({"set": set_name, "prompt": ids, "tokens": tokens})
    return runs


class Cost:
    """The measured cost curve, linear between the widths measured (and past the widest)."""

    def __init__(self, seconds: dict[int, float]) -> None:
        self.ks, self.s = sorted(seconds), seconds

    def __call__(self, k: int) -> float:
        ks, s = self.ks, self.s
        if k in s:
            return s[k]
        if k > ks[-1]:
            return s[ks[-1]] + (k - ks[-1]) * (s[ks[-1]] - s[ks[-2]]) / (ks[-1] - ks[-2])
        lo, hi = max(x for x in ks if x < k), min(x for x in ks if x > k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo) / (hi - lo)


def accepted_length(draft: list[int], truth: list[int]) -> int:
    n = 0
    for d, t in zip(draft, truth):
        if d != t:
            break
        n += 1
    return n


def replay(run: dict, drafter, control: DraftControl, cost: Cost, vocab: int) -> dict:
    """The engine's speculative loop (runtimes/speculation/steps.py) over a known greedy output."""
    truth, known = run["tokens"], 0
    drafter.start(run["prompt"])
    p, seconds, rounds, drafted, accepted = 1, 0.0, 0, 0, 0
    while p < len(truth):
        drafter.extend(truth[known:p])
        known = p
        k = min(control.next_length(), len(truth) - p)
        draft = drafter.propose(k) if k > 0 else []
        a = accepted_length(draft, truth[p:])
        rows = np.zeros((a + 1, vocab), np.float32)  # the model's rows after the kept inputs: one-hot argmax
        after = truth[p : p + a + 1]  # (a draft accepted to the output's end has no token after it)
        rows[np.arange(len(after)), after] = 1
        drafter.learn(truth[p - 1 : p] + draft[:a], rows)
        seconds += cost(1 + len(draft))
        if draft:
            control.update(len(draft), a)
            rounds, drafted, accepted = rounds + 1, drafted + len(draft), accepted + a
        p += a + 1
    return {"seconds": seconds, "rounds": rounds, "drafted": drafted, "accepted": accepted}


class NeverPaused(DraftControl):
    """Drafts whenever the drafter has a guess (lengths still adapt): the most its drafts can hit."""

    def update(self, drafted: int, accepted: int) -> None:
        super().update(drafted, accepted)
        self.paused = 0


def lookup_tree(seq: list[int], ngram_min: int, ngram_max: int, k: int, branches: int) -> list[list[int]]:
    """Up to `branches` distinct continuations (≤ k tokens) of earlier matches of the sequence's
    last n-gram, longest n first, latest first: the candidates a tree of lookup drafts would hold."""
    found: list[list[int]] = []
    for n in range(ngram_max, ngram_min - 1, -1):
        if len(seq) <= n:
            continue
        suffix = seq[-n:]
        for end in range(len(seq) - 1, n - 1, -1):
            if seq[end - n : end] == suffix:
                c = seq[end : end + k]
                if c not in found:
                    found.append(c)
                if len(found) == branches:
                    return found
    return found


def replay_tree(run: dict, ngram_min: int, k: int, branches: int, cost: Cost) -> dict:
    """Lookup with every candidate verified at once (a tree: its nodes are the candidates' distinct
    prefixes), drafting whenever there is a match (the tree's best case: no control)."""
    truth, prompt = run["tokens"], run["prompt"]
    p, seconds, rounds, accepted, nodes_run = 1, 0.0, 0, 0, 0
    while p < len(truth):
        found = lookup_tree(prompt + truth[:p], ngram_min, 4, min(k, len(truth) - p), branches)
        nodes = {tuple(c[:j]) for c in found for j in range(1, len(c) + 1)}
        a = max((accepted_length(c, truth[p:]) for c in found), default=0)
        seconds += cost(1 + len(nodes))
        if found:
            rounds, accepted, nodes_run = rounds + 1, accepted + a, nodes_run + len(nodes)
        p += a + 1
    return {"seconds": seconds, "rounds": rounds, "accepted": accepted, "nodes": nodes_run}


def summarize(rows: list[dict], plain_s: float, plain_steps: int) -> dict:
    """The replays of a set summed; plain_steps: the decode steps plain decoding takes for it. The
    bound is the speed-up if a forward of any width cost one step: what the drafts' hits alone allow."""
    total = {key: sum(r[key] for r in rows) for key in rows[0]}
    out = {key: v for key, v in total.items() if key != "seconds"}
    out["mean_accepted_length"] = round(total["accepted"] / total["rounds"], 2) if total["rounds"] else 0.0
    out["predicted_speedup"] = round(plain_s / total["seconds"], 2)
    out["bound_if_verifying_were_free"] = round(plain_steps / (plain_steps - total["accepted"]), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--engine", choices=("default", "torch"), default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=15, help="forwards per width")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model = edgetok.load(args.model, threads=args.threads, **({"backend": "torch"} if args.engine == "torch" else {}))
    seconds = forward_costs(model, args.context, args.repeat)
    cost = Cost(seconds)
    runs = plain_runs(model, args.new_tokens, args.context)
    vocab, min_draft = model.config.vocab_size, model.engine.backend.min_draft
    drafters = {
        "lookup (n 2-4)": lambda: PromptLookup(2, 4),
        "lookup (n 3-4)": lambda: PromptLookup(3, 4),
        "recycle": lambda: TokenRecycling(vocab),
    }
    report = {
        "model": args.model, "engine": model.choice.weights + " on " + model.choice.backend, "threads": args.threads,
        "context": args.context, "min_draft": min_draft,
        "forward_ms": {k: round(s * 1e3, 2) for k, s in seconds.items()},
        "forward_vs_one": {k: round(s / seconds[1], 2) for k, s in seconds.items()},
        "sets": {},
    }
    for set_name in ("input-grounded", "open"):
        rs = [r for r in runs if r["set"] == set_name]
        plain_steps = sum(len(r["tokens"]) - 1 for r in rs)
        plain_s = cost(1) * plain_steps
        table: dict = {"generated_tokens": [len(r["tokens"]) for r in rs]}
        for name, make in drafters.items():
            for k in (8, 16, 32):
                table[f"{name}, draft-max {k}"] = summarize(
                    [replay(r, make(), DraftControl(k, min_draft), cost, vocab) for r in rs], plain_s, plain_steps)
        for n_min in (1, 2):
            table[f"lookup (n {n_min}-4), never paused, draft-max 8"] = summarize(
                [replay(r, PromptLookup(n_min, 4), NeverPaused(8, min_draft), cost, vocab) for r in rs], plain_s, plain_steps)
        for branches in (1, 2, 4, 8):
            for k in (8, 16):
                table[f"lookup tree (n 2-4), {branches} branches, depth {k}, no control"] = summarize(
                    [replay_tree(r, 2, k, branches, cost) for r in rs], plain_s, plain_steps)
        report["sets"][set_name] = table
    emit(report, args.out)


if __name__ == "__main__":
    main()
