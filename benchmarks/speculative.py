"""Decode speed with and without speculative decoding, on input-grounded prompts (a ~1K-token
essay, source file, license, changelog, README or JSON document to summarize, quote, copy or edit) and open chat prompts: edgetok's engine
(the ONNX int4 export, and torch fp32) with --speculate none | lookup | recycle (chains, and trees of
the top-W candidates: "recycle wW", --widths), transformers'
prompt-lookup generation (`generate(..., prompt_lookup_num_tokens=K)`, fp32) and llama.cpp's
lookup decoding (llama-cpp-python's `LlamaPromptLookupDecoding` as the draft model, on the GGUF).

    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/speculative.py --repeat 3 \\
        --out benchmarks/results/speculative.json
    .venv/bin/python benchmarks/speculative.py --smoke      # ~20 s: does every part run?
    ... --only default,llama.cpp   (a cell of the run: the systems whose name has one of these)

Every system runs in this process, greedy, on the same chat-templated token ids, with the same
thread count, and stops at EOS (or --new-tokens). Runs interleave: each round runs every prompt on
every system in turn, so drift hits all alike; a warm-up run per system comes first. Decode
tokens/s counts the tokens after the first (EOS included) over the time from the first to the
last, as each system yields them. Speculative runs also report whether their tokens equal the same
engine's plain tokens (greedy exactness; quantized kernels may round several positions differently
from one, so a near-tie can flip). Each speculative generation starts with a cold drafter: the
rounds repeat the same prompts, which Token Recycling's table (kept between generations) would
otherwise have memorized.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import edgetok
from edgetok.bench.artifacts import gguf_file, hf_folder
from edgetok.models.sources import load_source
from edgetok.runtimes.speculation import new_drafter
from edgetok.texts import corpus, essays

REPO = Path(__file__).resolve().parents[1]
GOALS = "≥ 1.8× plain decode on input-grounded prompts, ≥ 0.95× on open chat, ≥ 1.5× llama.cpp's decode at 1K (input-grounded)"

OPEN = [
    "Write a short story about a lighthouse keeper who finds a strange bottle on the beach.",
    "What are three good habits for staying productive while working from home? Explain each briefly.",
    "Explain to a ten-year-old how a rainbow forms.",
]


def grounded_prompts(tok, context: int) -> list[str]:
    """Seven tasks over a document of about `context` tokens with the instruction: summarize and
    quote an essay, answer from it, edit a source file (the first three, since session 2), and
    quote a license, list a changelog's entries, extract a README's commands, copy JSON records
    (session 17: five kinds of document, not only essays and one Python file)."""
    doc_budget = context - 60  # the template and the instruction

    def cut(text: str) -> str:
        return tok.decode(tok.encode(text, add_special_tokens=False)[:doc_budget])

    essay = essays(context * 8)
    code = (REPO / "edgetok" / "runtimes" / "sampling.py").read_text()  # ≈ 900 tokens
    return [
        f"{cut(essay)}\n\nSummarize the essay above in one paragraph, quoting its key sentences word for word.",
        f"{cut(essay[len(essay) // 2 :])}\n\nAccording to the text above, what does the author argue? Answer with quotes from the text.",
        f"{cut(code)}\n\nRewrite the code above with the function `sample` renamed to `choose_token`. Output the code only.",
        f"{cut(corpus('legal', context * 8))}\n\nWhat does the license above require of someone who redistributes the "
        "work? Quote the sentences that say so, word for word.",
        f"{cut(corpus('changelog', context * 8))}\n\nList the changes of the first version in the changelog above, one "
        "per line, in the changelog's own words.",
        f"{cut(corpus('docs', context * 8))}\n\nCopy the installation commands from the document above, exactly as written.",
        f"{cut(corpus('structured', context * 8))}\n\nOutput the first two entries of the JSON above, unchanged.",
    ]


def verbatim_prompts() -> list[str]:
    """Two tasks whose answer copies its input: the case prompt lookup is for (kept apart from the
    input-grounded set, whose answers paraphrase)."""
    essay = essays(6000)
    code = (REPO / "edgetok" / "runtimes" / "sampling.py").read_text()
    function = code[code.index("def filter_logits") : code.index("def sample")]
    return [
        f"Repeat the following text word for word.\n\n{essay[:1500]}",
        f"{function}\nRewrite the function above with its argument `p` renamed to `params`. Output the code only.",
    ]


@dataclass
class Run:
    tokens: list[int]
    decode_tokens_per_s: float
    extra: dict  # drafted, accepted, … where the system reports them


Runner = Callable[[list[int], int], Run]


def edgetok_runner(model: edgetok.Model, method: str, draft_max: int, threads: int, torch_threads: bool) -> Runner:
    """method: none, lookup, recycle, or "recycle wW" (a tree of each token's top-W candidates)."""
    from edgetok.runtimes.engine import GenerationConfig

    speculate, _, width = method.partition(" w")

    def run(ids: list[int], n: int) -> Run:
        torch.set_num_threads(threads if torch_threads else 1)  # (edgetok.load sets 1 for the other runtimes)
        model.engine.reset()
        cfg = GenerationConfig(max_new_tokens=n, speculate=speculate, draft_max=draft_max, draft_width=int(width or 1))
        drafter = new_drafter(cfg, model.config.vocab_size) if speculate != "none" else None  # cold
        *_, result = model.engine.generate_ids(ids, cfg, drafter=drafter)  # text pieces, then the Result
        s = result.stats
        extra = {"drafted": s.drafted, "accepted": s.accepted, "mean_accepted_length": round(s.mean_accepted_length, 2)}
        return Run(result.tokens, s.decode_tokens_per_s, extra if speculate != "none" else {})

    return run


def decode_rate(times: list[float]) -> float:
    """Tokens after the first over the time from the first to the last."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def transformers_runner(folder: Path, lookup: int, threads: int) -> Runner:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    class Clock(BaseStreamer):
        """The time each new token arrives (generate puts the prompt first)."""

        def __init__(self) -> None:
            self.calls: list[tuple[float, int]] = []

        def put(self, value) -> None:
            self.calls.append((time.perf_counter(), value.numel()))

        def end(self) -> None:
            pass

    def run(ids: list[int], n: int) -> Run:
        torch.set_num_threads(threads)
        clock = Clock()
        extra = dict(prompt_lookup_num_tokens=lookup) if lookup else {}
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, streamer=clock, **extra)
        times = [t for t, count in clock.calls[1:] for _ in range(count)]  # a step may bring several tokens
        return Run(out[0, len(ids) :].tolist(), decode_rate(times), {})

    return run


def llamacpp_runner(path: Path, lookup: int, threads: int, n_ctx: int) -> Runner:
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup else None
    # logits_all with a draft model: llama-cpp-python 0.3.36 sizes its score rows by logits_all, not
    # by the draft model it then keeps every position's logits for (the prompt overflows otherwise)
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          draft_model=draft, logits_all=draft is not None, verbose=False)
    eos = llm.token_eos()

    def run(ids: list[int], n: int) -> Run:
        torch.set_num_threads(1)
        tokens, times = [], []
        for token in llm.generate(ids, temp=0.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(token)
            if token == eos or len(tokens) == n:
                break
        return Run(tokens[:-1] if tokens[-1] == eos else tokens, decode_rate(times), {})

    return run


def systems(args) -> dict[str, Runner]:
    """name → runner; a speculative system's plain twin is its name with 'none' for the method.
    Only the systems --only names are loaded."""
    k, t = args.draft_max, args.threads
    source = load_source(args.model)
    ours = ("none", "lookup", "recycle", *(f"recycle w{w}" for w in map(int, args.widths.split(",")) if w > 1))
    families = {  # name prefix → the methods and how to make each runner (the model loaded once)
        "edgetok default": (ours, lambda: edgetok.load(args.model, threads=t)),
        "edgetok torch fp32": (ours, lambda: edgetok.load(args.model, backend="torch", threads=t)),
        "transformers fp32": (("none", "lookup"), lambda: hf_folder(args.model, source)),
        "llama.cpp": (("none", "lookup"), lambda: gguf_file(args.model, source)),
    }
    if args.smoke:
        families = {name: f for name, f in families.items() if name in ("edgetok default", "llama.cpp")}
    n_ctx = args.context + args.new_tokens + 64
    out: dict[str, Runner] = {}
    for family, (methods, load) in families.items():
        names = [f"{family} / {method}" for method in methods]
        names = [n for n in names if not args.only or any(o in n for o in args.only.split(","))]
        if not names:
            continue
        loaded = load()
        for name in names:
            method = name.rsplit(" / ", 1)[1]
            if family.startswith("edgetok"):
                out[name] = edgetok_runner(loaded, method, k, t, torch_threads="torch" in family)
            elif family.startswith("transformers"):
                out[name] = transformers_runner(loaded, k if method == "lookup" else 0, t)
            else:
                out[name] = llamacpp_runner(loaded, k if method == "lookup" else 0, t, n_ctx)
    return out


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=1024, help="tokens of an input-grounded prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--draft-max", type=int, default=8, help="drafted tokens per step, every system")
    ap.add_argument("--widths", default="2,3", help="edgetok's recycle trees: the top-W candidates per token (--draft-width)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default="input-grounded,open", help="prompt sets: input-grounded, open, verbatim")
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only the systems whose name has one")
    ap.add_argument("--smoke", action="store_true", help="a quick check: one prompt per set, 24 tokens, edgetok default and llama.cpp")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.new_tokens, args.repeat = 24, 1

    runners = systems(args)
    tok = edgetok.load(args.model).tokenizer
    sets = {"input-grounded": grounded_prompts(tok, args.context), "open": OPEN, "verbatim": verbatim_prompts()}
    sets = {name: prompts for name, prompts in sets.items() if name in args.sets.split(",")}
    if args.smoke:
        sets = {name: prompts[:1] for name, prompts in sets.items()}
    ids = {(s, i): tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
           for s, prompts in sets.items() for i, p in enumerate(prompts)}
    for run in runners.values():  # warm-up: first-call allocations, thread pools, lazy loading
        run(next(iter(ids.values())), 8)
    runs: dict[tuple, list[Run]] = {}
    for round_ in range(args.repeat):
        for key, prompt in ids.items():
            for name, run in runners.items():
                r = run(prompt, args.new_tokens)
                runs.setdefault((name, *key), []).append(r)
                print(f"round {round_ + 1} {key[0]} #{key[1]} {name}: {r.decode_tokens_per_s:.1f} tok/s, "
                      f"{len(r.tokens)} tokens {r.extra or ''}", file=sys.stderr, flush=True)

    report: dict = {
        "model": args.model, "threads": args.threads, "new_tokens": args.new_tokens, "draft_max": args.draft_max,
        "repeat": args.repeat, "grounded_prompt_tokens": [len(ids[k]) for k in ids if k[0] == "input-grounded"],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "goals": GOALS, "sets": {},
    }
    for set_name, prompts in sets.items():
        table = {}
        for name in runners:
            per_prompt = [statistics.median(r.decode_tokens_per_s for r in runs[name, set_name, i]) for i in range(len(prompts))]
            entry = {"decode_tokens_per_s": round(geomean(per_prompt), 2), "per_prompt": [round(x, 2) for x in per_prompt],
                     "tokens": [len(runs[name, set_name, i][-1].tokens) for i in range(len(prompts))]}
            plain = name.rsplit(" / ", 1)[0] + " / none"
            if plain != name and plain in runners:
                entry["speedup_vs_plain"] = round(entry["decode_tokens_per_s"] / table[plain]["decode_tokens_per_s"], 2)
                entry["same_tokens_as_plain"] = [runs[name, set_name, i][-1].tokens == runs[plain, set_name, i][-1].tokens
                                                 for i in range(len(prompts))]
            extras = [runs[name, set_name, i][-1].extra for i in range(len(prompts))]
            if any(extras):
                entry["drafts"] = extras
            table[name] = entry
        for name, entry in table.items():
            for peer in ("llama.cpp / none", "llama.cpp / lookup"):
                if name.startswith("edgetok") and peer in table:
                    entry[f"vs {peer}"] = round(entry["decode_tokens_per_s"] / table[peer]["decode_tokens_per_s"], 2)
        report["sets"][set_name] = table
    emit(report, args.out)


def emit(report: dict, out: Path | None) -> None:
    """The report as JSON on stdout, and into `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
