"""The ONNX graph's two attention kinds, decode and prefill speed at 1K and 8K context.

    .venv/bin/python benchmarks/onnx_attention.py --contexts 1024,8000 --threads 2 --repeat 2

SmolLM2 exported at int4 twice (`--attention gqa`, the default, and `--attention standard`), each
run as its own `edgetok run DIR ... --json` process on the same real-text prompt (no chat
template), greedy, exact KV cache and `--kv-budget 25%`, rounds interleaved, under
/tmp/edgetok-bench.lock. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import edgetok
from edgetok.texts import essays

EDGETOK = str(Path(sys.executable).parent / "edgetok")
KINDS = ("gqa", "standard")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1024,8000")
    ap.add_argument("--budgets", default="100%,25%")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgetok-attention-"))
    for kind in KINDS:
        subprocess.run([EDGETOK, "export", "smollm2", "--format", "onnx", "--weights", "int4", "--attention", kind,
                        "--no-verify", "-o", str(work / kind)], check=True, capture_output=True)
    tok = edgetok.load(str(work / "gqa")).tokenizer
    ids = tok.encode(essays(200_000), add_special_tokens=False)
    runs: dict[tuple, list[dict]] = {}
    with open("/tmp/edgetok-bench.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for round_ in range(args.repeat):
            for ctx in map(int, args.contexts.split(",")):
                prompt = work / f"prompt-{ctx}.txt"
                prompt.write_text(tok.decode(ids[: ctx - args.new_tokens]))
                for budget in args.budgets.split(","):
                    for kind in KINDS:
                        cmd = [EDGETOK, "run", str(work / kind), "-f", str(prompt), "--no-chat", "-n", str(args.new_tokens),
                               "--threads", str(args.threads), "--kv-budget", budget, "--json"]
                        p = subprocess.run(cmd, capture_output=True, text=True)
                        if p.returncode != 0:
                            raise SystemExit(f"{kind} at {ctx}: {p.stderr.strip()}")
                        stats = json.loads(p.stdout)["stats"]
                        runs.setdefault((ctx, budget, kind), []).append(stats)
                        print(f"round {round_ + 1} {ctx} {budget} {kind}: decode {stats['decode_tokens_per_s']} tok/s, "
                              f"prefill {stats['prefill_tokens_per_s']} tok/s", file=sys.stderr, flush=True)
    rows = []
    print("| context | KV budget | attention | decode tok/s (min–max) | prefill tok/s |")
    print("|---|---|---|---|---|")
    for (ctx, budget, kind), rs in runs.items():
        decode = [r["decode_tokens_per_s"] for r in rs]
        prefill = statistics.median(r["prefill_tokens_per_s"] for r in rs)
        rows.append({"context": ctx, "budget": budget, "attention": kind, "decode_tok_s": statistics.median(decode),
                     "decode_min_max": [min(decode), max(decode)], "prefill_tok_s": prefill})
        print(f"| {ctx} | {budget} | {kind} | {statistics.median(decode):.1f} ({min(decode):.1f}–{max(decode):.1f}) | {prefill:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
