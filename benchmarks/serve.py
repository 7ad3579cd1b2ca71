"""Serving throughput: aggregate decode tokens/s and request latency at 1, 2, 4 and 8 concurrent
clients, `edgetok serve MODEL` (the default engine: its export, continuous batching) vs llama-cpp-python's own
server (`python -m llama_cpp.server`) on the model's GGUF, both with 2 threads, both through the
official openai client.

    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/serve.py --repeat 2 --out benchmarks/results/serve.json
    .venv/bin/python benchmarks/serve.py --smoke      # ~1 min: does every part run?

Both servers run for the whole benchmark (an idle one takes no CPU); the cells interleave: each
round runs every concurrency on each server in turn. A cell: C clients, each sending --requests chat
requests one after the other (greedy, exactly --max-tokens each: end-of-sequence is banned —
edgetok's `ignore_eos`, llama.cpp's `logit_bias` — so both servers decode the same number of tokens
whatever their weights' rounding; the prompts rotate over several kinds of text). Aggregate tokens/s
= the completion tokens of every request of the cell ÷ the cell's wall time (so prefill and the HTTP
round trips count against it; the prompts are short). Latency = one request's time from sending to
its whole answer; p50 / p95 over the cell's requests of every round. The goal: ≥ 2× one client's
throughput at 4 clients; a server that runs one request at a time stays at 1×.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

from edgetok.bench.artifacts import gguf_file
from edgetok.models.sources import load_source

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "serve"))
from serving import free_port  # noqa: E402  (the tests' helper: a free loopback port)

GOAL = "≥ 2× a single client's aggregate decode tokens/s at 4 clients"
PROMPTS = [  # several kinds of text: story, explanation, code, list, translation, facts
    "Write a short story about a lighthouse keeper who finds a strange bottle on the beach.",
    "Explain to a ten-year-old how a rainbow forms.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "List five good habits for staying productive while working from home, with one sentence each.",
    "Translate into French and explain the grammar: 'The cat sleeps on the warm windowsill.'",
    "What are the main differences between a comet and an asteroid?",
]


class Peer:
    """A server process on a free loopback port."""

    def __init__(self, name: str, cmd: list[str], log: Path, no_eos: dict) -> None:
        self.name, self.port, self.no_eos = name, free_port(), no_eos  # no_eos: the request fields that ban EOS
        self.log = open(log, "wb")
        self.process = subprocess.Popen([*cmd, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=600)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{name} exited: {log.read_text()[-2000:]}")
            try:
                self.model = self.client.models.list().data[0].id
                return
            except (openai.APIConnectionError, openai.InternalServerError):  # not listening yet; loading (503)
                time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{name} did not start")

    def ask(self, prompt: str, max_tokens: int) -> tuple[int, float]:
        """(completion tokens, seconds) of one greedy chat request."""
        t = time.perf_counter()
        r = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, extra_body=self.no_eos)
        return r.usage.completion_tokens, time.perf_counter() - t

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def cell(peer: Peer, clients: int, requests: int, max_tokens: int, offset: int) -> dict:
    """C clients × R requests each, concurrently → tokens, wall time, each request's latency."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for j in range(requests):
            n, dt = peer.ask(PROMPTS[(offset + c * requests + j) % len(PROMPTS)], max_tokens)
            with lock:
                tokens[0] += n
                latencies.append(dt)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return {"tokens": tokens[0], "wall_s": wall, "latencies_s": latencies}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per cell")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="rounds (cells interleave across systems)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="1 and 2 clients, 1 request of 16 tokens, one round")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.requests, args.max_tokens, args.repeat = "1,2", 1, 16, 1
    levels = [int(x) for x in args.clients.split(",")]
    source = load_source(args.model)
    gguf = gguf_file(args.model, source)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    edgetok_cmd = [sys.executable, "-c", "from edgetok.cli import main; main()", "serve", args.model, "--threads",
                   str(args.threads), "--max-sequences", str(max(levels)), "--max-queue", "64", "--alias", args.model]
    llama_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(args.threads),
                 "--n_threads_batch", str(args.threads), "--n_ctx", "2048", "--model_alias", args.model, "--host", "127.0.0.1"]
    eos = source.tokenizer.eos_ids
    peers = [Peer("edgetok serve (default engine, batched)", edgetok_cmd, logs / "edgetok-serve-bench.log", {"ignore_eos": True})]
    try:
        peers.append(Peer("llama-cpp-python server (gguf)", llama_cmd, logs / "llamacpp-server-bench.log",
                          {"logit_bias": {str(t): -100 for t in eos}}))
    except BaseException:
        peers[0].stop()
        raise
    results: dict[str, dict[int, list[dict]]] = {p.name: {c: [] for c in levels} for p in peers}
    try:
        for p in peers:  # warm-up: first requests load lazily, fill caches
            cell(p, 1, 1, 8, 0)
        for r in range(args.repeat):
            for c in levels:
                for p in peers if r % 2 == 0 else reversed(peers):
                    out = cell(p, c, args.requests, args.max_tokens, offset=r)
                    results[p.name][c].append(out)
                    print(f"round {r} {p.name} ×{c}: {out['tokens'] / out['wall_s']:.1f} tok/s", file=sys.stderr)
    finally:
        for p in peers:
            p.stop()
    rows = []
    for name, by in results.items():
        base = None
        for c in levels:
            cells = by[c]
            rate = sum(x["tokens"] for x in cells) / sum(x["wall_s"] for x in cells)
            lat = [v for x in cells for v in x["latencies_s"]]
            base = base or rate
            rows.append({"system": name, "clients": c, "tokens_per_s": round(rate, 1), "vs_one_client": round(rate / base, 2),
                         "p50_latency_s": round(percentile(lat, 0.5), 2), "p95_latency_s": round(percentile(lat, 0.95), 2),
                         "requests": len(lat), "tokens": sum(x["tokens"] for x in cells)})
    ratios = {c: round(next(r["tokens_per_s"] for r in rows if r["clients"] == c and r["system"] == peers[0].name)
                       / next(r["tokens_per_s"] for r in rows if r["clients"] == c and r["system"] == peers[1].name), 2)
              for c in levels}
    report = {"goal": GOAL, "model": args.model, "edgetok": "edgetok serve MODEL", "gguf": str(gguf), "threads": args.threads,
              "requests_per_client": args.requests, "max_tokens": args.max_tokens, "rounds": args.repeat,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "shared": True},
              "rows": rows, "edgetok_vs_llamacpp": ratios}
    print("| system | clients | aggregate tok/s | × one client | p50 latency s | p95 latency s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['system']} | {r['clients']} | {r['tokens_per_s']} | {r['vs_one_client']} | {r['p50_latency_s']} | "
              f"{r['p95_latency_s']} |")
    print(f"edgetok / llama.cpp at each concurrency: {ratios}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
