"""Fidelity on many kinds of text: the tiered cache's budgets and prompt pruning against exact runs.

    .venv/bin/python benchmarks/fidelity.py --kinds all --contexts 4096,8192 --budgets 25%,auto \
        --new-tokens 64 --out benchmarks/results/fidelity.json

SmolLM2-135M-Instruct (or --model), fp32 torch backend. For each kind of text (edgetok/texts.py
names each source) and context:

- agreement: the prompt is the chat template's head and then the text (about `context` tokens; a
  base model such as gemma3-270m: BOS and the text, and its needle prompts end "Question: …" and
  "Answer: The secret passphrase for the vault is '").
  Full attention (the tiered cache at 100 %: float32, exact) generates `--new-tokens` greedily;
  each budgeted cache is fed the same tokens (teacher forcing) and we count how often its argmax
  agrees, the mean KL(full ‖ budgeted), the budget it used (tokens read / tokens there were), the
  attention mass its selection captured (exact, every 16th step, kv/fidelity.py) and its decode
  speed (teacher-forced steps per second, the systems one after another in this process).
- needles: the same text with "The secret passphrase for the vault is 'amber falcon 7319'."
  planted at 10 / 50 / 90 % depth and the question at the end (chat template); 20 greedy tokens
  per system; found = "7319" in them. Systems: full attention, each budget, and --prune-prompt
  KEEP after the default layer (exact cache). --answer-start begins the assistant's answer too
  (ANSWER_START): whether the fact survived, not whether a small chat model chooses to answer.

The exact prefill is shared: every budgeted cache starts from the full run's prompt K/V and last
queries (KVState; cast to the cache's bf16), so one prefill serves all of them, and a needle prompt
reuses the K/V of the text before the needle. (In `edgetok run` a budgeted cache's prefill reads
bf16 K/V itself; the difference is not what this measures.) Each (kind, context) unit runs under
/tmp/edgetok-bench.lock; --out is rewritten after every unit.

    --parts selection: per layer, with the prompt's last 32 queries (the observation window) and
    its 16-token chunks, the attention mass that a 25 % selection by the chunks' bounds captures,
    against the best 25 % of chunks chosen from the exact attention (an oracle): how much of the
    loss at a fixed budget is the ranking's, and how much the budget's. No extra prefill.

    --parts speed: prompt pruning's prefill time at one context, rounds interleaved (none, pruned),
    wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import edgetok
from edgetok.bench.lock import bench_lock
from edgetok.kernels.pruning import window_attention
from edgetok.kernels.selection import chunk_shares, key_abstracts
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.kv import KVConfig, KVState
from edgetok.runtimes.kv.config import SCORING_CHOICES, SELECTION_CHOICES, SUMMARIES_CHOICES
from edgetok.runtimes.prune import PrunePlan
from edgetok.texts import KINDS, corpus

NEEDLE = "The secret passphrase for the vault is 'amber falcon 7319'."
QUESTION = "What is the secret passphrase for the vault?"
ANSWER = "7319"
PIECE = 512  # prefill tokens per forward, as the engine's default
SENTINEL = "SENTINEL"
# The answer's first words: a base model's needle prompt ends "Answer: " and them; a chat model's with --answer-start
ANSWER_START = "The secret passphrase for the vault is '"



class Prompts:
    """Token ids of one kind's prompts: the chat head, the text, and the needle's pieces."""

    def __init__(self, model: edgetok.Model, kind: str, context: int, answer_start: bool = False) -> None:
        tok = model.tokenizer
        self.needle = tok.encode("\n" + NEEDLE + "\n", add_special_tokens=False)
        if tok.chat_template:
            ids = model.encode([{"role": "user", "content": SENTINEL}], chat=True)
            mark = tok.encode(SENTINEL, add_special_tokens=False)
            at = next(i for i in range(len(ids)) if ids[i : i + len(mark)] == mark)
            self.head, self.tail = ids[:at], ids[at + len(mark) :]  # the template around the user's text
            if answer_start:  # the assistant's turn begins with the answer's first words
                self.tail = self.tail + tok.encode(ANSWER_START, add_special_tokens=False)
            self.question = tok.encode("\n\n" + QUESTION, add_special_tokens=False)
        else:  # a base model: plain text, the question and an answer's start (as gemma_needle.py asks)
            self.head = tok.encode("")  # its BOS
            self.question = tok.encode(f"\n\nQuestion: {QUESTION}\n", add_special_tokens=False)
            self.tail = tok.encode("Answer: " + ANSWER_START, add_special_tokens=False)
        room = context - len(self.head) - len(self.needle) - len(self.question) - len(self.tail)
        self.body = tok.encode(corpus(kind, context * 8), add_special_tokens=False)[:room]
        self.text = self.head + self.body  # the agreement prompt

    def needle_prompt(self, depth: float) -> tuple[list[int], int]:
        """The needle prompt and how many of its first tokens it shares with `text`."""
        cut = int(len(self.body) * depth)
        return self.head + self.body[:cut] + self.needle + self.body[cut:] + self.question + self.tail, len(self.head) + cut


def prefill(backend: TorchBackend, cache, tokens: list[int]):
    logits = None
    for i in range(0, len(tokens), PIECE):
        logits = backend.forward(tokens[i : i + PIECE], cache)
    return torch.from_numpy(logits[-1])


def decode(backend: TorchBackend, cache, logits: torch.Tensor, steps: int, follow: list[int] | None = None):
    """Greedy (or teacher-forced along `follow`) → tokens, logits (steps, V), seconds."""
    tokens, rows = [], []
    t = time.perf_counter()
    for s in range(steps):
        rows.append(logits)
        tokens.append(int(logits.argmax()) if follow is None else follow[s])
        if s < steps - 1:
            logits = torch.from_numpy(backend.forward([tokens[-1]], cache)[-1])
    return tokens, torch.stack(rows), time.perf_counter() - t


def from_state(backend: TorchBackend, state: KVState, logits: torch.Tensor, steps: int, follow=None):
    cache = backend.new_cache()
    cache.state = state
    backend.end_prefill(cache)
    out = decode(backend, cache, logits, steps, follow)
    stats = backend.cache_stats(cache)
    cache.close()
    return (*out, stats)


def kl_mean(ref: torch.Tensor, got: torch.Tensor) -> float:
    p = ref.log_softmax(-1)
    return (p.exp() * (p - got.log_softmax(-1))).sum(-1).mean().item()


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.model = edgetok.load(args.model, backend="torch", threads=args.threads)
        source = self.model.source
        self.exact = self.model.engine.backend  # the contiguous cache: pruned prefills
        self.full = self._tiered(KVConfig(budget="100%"))
        self.budgets = {b: self._tiered(budget_config(b)) for b in args.budgets.split(",")}
        pools = [int(p) for p in args.prune_pools.split(",")] if args.prune_pools else [None]
        self.plans = [plan if pool is None else dataclasses.replace(plan, pool=pool)
                      for plan in (PrunePlan.checked(float(k), None, self.model.config) for k in args.keeps.split(",") if k)
                      for pool in pools]
        del source

    def _tiered(self, kv: KVConfig) -> TorchBackend:
        b = TorchBackend(self.model.source, kv=kv)
        b.model = self.exact.model  # one copy of the weights
        return b

    def agreement(self, kind: str, prompts: Prompts) -> tuple[list[dict], KVState]:
        cache = self.full.new_cache()
        logits = prefill(self.full, cache, prompts.text)
        state = cache.state
        self.full.end_prefill(cache)
        ref, ref_rows, ref_s = decode(self.full, cache, logits, self.args.new_tokens)
        cache.close()
        rows = [{"kind": kind, "context": len(prompts.text), "system": "full", "decode_tok_s": round(len(ref) / ref_s, 2)}]
        for name, backend in self.budgets.items():
            _, got, seconds, stats = from_state(backend, state, logits, self.args.new_tokens, follow=ref)
            rows.append({
                "kind": kind, "context": len(prompts.text), "system": name,
                "greedy_agreement": round((got.argmax(-1) == torch.tensor(ref)).float().mean().item(), 4),
                "kl_mean": round(kl_mean(ref_rows, got), 5),
                "budget_used": stats["budget_used"], "summaries_read": stats.get("summaries_read", 0.0),
                "captured_mass": stats.get("captured_mass"), "captured_mass_min_head": stats.get("captured_mass_min_head"),
                "coverage_estimated": stats.get("coverage_estimated"),
                "budget_per_layer": stats["budget_per_layer"], "temperatures": stats.get("coverage_temperatures"),
                "captured_mass_per_layer": stats.get("captured_mass_per_layer"),
                "decode_tok_s": round(len(ref) / seconds, 2),
            })
        return rows, state

    def needles(self, kind: str, prompts: Prompts, state: KVState) -> list[dict]:
        rows = []
        for depth in map(float, self.args.needle_depths.split(",")):
            tokens, shared = prompts.needle_prompt(depth)
            cache = self.full.new_cache()
            prefix = state.prefix(shared)  # None where a sliding layer no longer holds what the needle's tokens see
            if prefix is not None:
                cache.state = dataclasses.replace(prefix, q_obs=None)  # the needle prompt's own end measures them
            logits = prefill(self.full, cache, tokens[0 if prefix is None else shared :])
            needle_state = cache.state
            self.full.end_prefill(cache)
            found = {"full": self._found(decode(self.full, cache, logits, self.args.needle_tokens)[0])}
            cache.close()
            for name, backend in self.budgets.items():
                found[name] = self._found(from_state(backend, needle_state, logits, self.args.needle_tokens)[0])
            for plan in self.plans:
                cache = self.exact.new_cache()
                pruned = self.exact.prefill_pruned(tokens, cache, plan, PIECE)
                self.exact.end_prefill(cache)
                found[self._plan_name(plan)] = self._found(
                    decode(self.exact, cache, torch.from_numpy(pruned.logits), self.args.needle_tokens)[0])
            rows.append({"kind": kind, "context": len(tokens), "needle_depth": depth, "found": found})
        return rows

    def _plan_name(self, plan: PrunePlan) -> str:
        return f"prune {plan.keep}" + (f" pool {plan.pool}" if self.args.prune_pools else "")

    def _found(self, tokens: list[int]) -> bool:
        return ANSWER in self.model.tokenizer.decode(tokens)

    def speed(self, kind: str, context: int) -> list[dict]:
        """Prefill wall and CPU seconds, no pruning vs each plan, rounds interleaved."""
        tokens = Prompts(self.model, kind, context).needle_prompt(0.5)[0]
        times: dict[str, list[tuple[float, float]]] = {}
        for _ in range(self.args.repeat):
            for plan in [None, *self.plans]:
                cache = self.exact.new_cache()
                t, cpu = time.perf_counter(), time.process_time()
                if plan is None:
                    prefill(self.exact, cache, tokens)
                else:
                    self.exact.prefill_pruned(tokens, cache, plan, PIECE)
                times.setdefault("none" if plan is None else self._plan_name(plan), []).append(
                    (time.perf_counter() - t, time.process_time() - cpu))
                del cache
        base = times["none"]
        rows = []
        for name, runs in times.items():
            wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows.append({"kind": kind, "context": len(tokens), "prefill": name, "wall_s": [round(r[0], 2) for r in runs],
                         "cpu_s": [round(r[1], 2) for r in runs],
                         "speedup_wall": round(statistics.median(r[0] for r in base) / wall, 2),
                         "speedup_cpu": round(statistics.median(r[1] for r in base) / cpu, 2)})
        return rows


def selection(kind: str, state: KVState, share: float = 0.25, size: int = 16) -> dict:
    """Captured attention mass of the observation queries at a `share` of each layer's chunks:
    chosen by the chunks' bounds (as the cache does) and by the exact attention (oracle); the
    window and the tokens after the last whole chunk are always read."""
    bound, oracle = [], []
    for (k, _), q in zip(state.layers, state.q_obs):
        hq, w, d = q.shape
        hkv, n = k.shape[0], k.shape[1]
        c = (n - w) // size
        p = window_attention(q, k)  # (Hq, W, N)
        mass = p[:, :, : c * size].reshape(hq, w, c, size).sum(-1).transpose(0, 1)  # (W, Hq, C)
        rest = p[:, :, c * size :].sum(-1).transpose(0, 1)  # (W, Hq)
        abstracts = key_abstracts(k[:, : c * size].float().reshape(hkv, c, size, d)).expand(w, -1, -1, -1)
        scores = chunk_shares(q.float().transpose(0, 1), abstracts).amax(-2)  # (W, C)
        budget = max(1, int(share * c))
        bound.append(_captured(mass, rest, scores.topk(budget, -1).indices))
        oracle.append(_captured(mass, rest, mass.amax(1).topk(budget, -1).indices))
    return {"kind": kind, "context": state.layers[0][0].shape[1], "selection_share": share,
            "captured_by_bounds": round(sum(bound) / len(bound), 4), "captured_by_oracle": round(sum(oracle) / len(oracle), 4),
            "captured_by_bounds_per_layer": [round(x, 3) for x in bound],
            "captured_by_oracle_per_layer": [round(x, 3) for x in oracle]}


def _captured(mass: torch.Tensor, rest: torch.Tensor, chosen: torch.Tensor) -> float:
    """mass (W, Hq, C) per chunk, rest (W, Hq) outside them, chosen (W, K) chunk ids → mean captured."""
    picked = torch.zeros(mass.shape[0], mass.shape[2]).scatter(1, chosen, 1.0)  # (W, C)
    return ((mass * picked[:, None]).sum(-1) + rest).mean().item()


def budget_config(system: str) -> KVConfig:
    """'25%', 'auto' or 'auto:0.98' (a coverage target), each optionally followed by '/on' or '/off'
    (--kv-summaries), '/layer' or '/head' (--kv-selection) and '/tokens' or '/bounds'
    (--kv-scoring); without them, the defaults."""
    budget, *knobs = system.split("/")
    summaries = next((k for k in knobs if k in SUMMARIES_CHOICES), None)
    selection = next((k for k in knobs if k in SELECTION_CHOICES), None)
    scoring = next((k for k in knobs if k in SCORING_CHOICES), None)
    if budget.startswith("auto:"):
        return KVConfig(budget="auto", coverage=float(budget.split(":")[1]), summaries=summaries, selection=selection,
                        scoring=scoring)
    return KVConfig(budget=budget, summaries=summaries, selection=selection, scoring=scoring)


def report(results: list[dict]) -> str:
    """BENCHMARKS.md's tables from a results file: per kind and context, each system's agreement,
    KL, budget used, captured mass and decode speed; then the needles."""
    lines = ["| kind | context | system | greedy agreement | KL mean | budget used | captured mass (min head) | decode tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "greedy_agreement" in r:
            mass = "–" if r["captured_mass"] is None else f"{r['captured_mass']:.3f} ({r['captured_mass_min_head']:.2f})"
            lines.append(f"| {r['kind']} | {r['context']} | {r['system']} | {r['greedy_agreement']:.1%} | {r['kl_mean']:.4f} "
                         f"| {r['budget_used']:.1%} | {mass} | {r['decode_tok_s']} |")
    lines += ["", "| kind | context | selection at 25 %: captured by bounds | by an oracle |", "|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['context']} | {r['captured_by_bounds']:.3f} | {r['captured_by_oracle']:.3f} |"
              for r in results if "captured_by_bounds" in r]
    needles = [r for r in results if "needle_depth" in r]
    if needles:
        systems = list(needles[0]["found"])
        lines += ["", "| kind | context | depth | " + " | ".join(systems) + " |", "|---|---|---|" + "---|" * len(systems)]
        lines += [f"| {r['kind']} | {r['context']} | {r['needle_depth']:.0%} | "
                  + " | ".join("✓" if r["found"].get(s) else "✗" for s in systems) + " |" for r in needles]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", type=Path, default=None, help="print the tables of this results file and stop")
    ap.add_argument("--model", default="smollm2", help="a model name or file (a base model gets plain-text prompts)")
    ap.add_argument("--kinds", default="all", help=f"comma-separated, of {', '.join(KINDS)}; or all")
    ap.add_argument("--contexts", default="4096,8192")
    ap.add_argument("--budgets", default="25%,auto", help="fixed shares and auto (auto:C sets --kv-coverage C)")
    ap.add_argument("--keeps", default="0.5", help="--prune-prompt KEEP values for the needles (empty: none)")
    ap.add_argument("--prune-pools", default="", help="pooling widths to try with each KEEP (PrunePlan.pool; empty: its default)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--needle-tokens", type=int, default=20)
    ap.add_argument("--needle-depths", default="0.1,0.5,0.9")
    ap.add_argument("--answer-start", action="store_true",
                    help="a chat model's needle prompts also begin the answer (the assistant's turn starts with "
                         "ANSWER_START, as a base model's prompt does): retrieval, not whether it chooses to answer")
    ap.add_argument("--parts", default="agreement,selection,needles")
    ap.add_argument("--repeat", type=int, default=2, help="speed: interleaved rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return
    bench = Bench(args)
    kinds = list(KINDS) if args.kinds == "all" else args.kinds.split(",")
    parts = args.parts.split(",")
    results = json.loads(args.out.read_text()) if args.out and args.out.exists() else []

    def emit(rows: list[dict]) -> None:
        for row in rows:
            results.append(row)
            print(json.dumps(row), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    for kind in kinds:
        for context in map(int, args.contexts.split(",")):
            with bench_lock():
                if "speed" in parts:
                    emit(bench.speed(kind, context))
                if "agreement" in parts or "needles" in parts or "selection" in parts:
                    prompts = Prompts(bench.model, kind, context, args.answer_start)
                    rows, state = bench.agreement(kind, prompts)
                    if "agreement" in parts:
                        emit(rows)
                    if "selection" in parts:
                        emit([selection(kind, state)])
                    if "needles" in parts:
                        emit(bench.needles(kind, prompts, state))


if __name__ == "__main__":
    main()
