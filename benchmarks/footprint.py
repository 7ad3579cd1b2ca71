"""The default engine's footprint: peak RSS at a 1K prompt and time to first token of a short one.

Each run is a fresh process, measured from outside (os.wait4's rusage: the peak RSS of the whole
process; the first byte on stdout: the first token, process start and load included):
- `edgetok run smollm2` with no engine options (the default engine, its export already built),
  with this checkout's code, and with the code of `--before` (a checkout from before the run path
  dropped torch), when given;
- llama.cpp (llama-cpp-python, the same Q4_1 GGUF, n_ctx 2048) on the same text, 2 threads each.
Systems are interleaved, `--rounds` times; the table reports medians (min–max).

    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/footprint.py [--before DIR] [--out benchmarks/results/footprint.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgetok import texts
from edgetok.models.sources import load_source, resolve_path

THREADS = 2
NEW_TOKENS = 64
SHORT = "What is the capital of France? Answer in one sentence."
LLAMA = f"""
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=2048, n_threads={THREADS}, n_threads_batch={THREADS}, verbose=False)
out = llm(open(sys.argv[2]).read(), max_tokens={NEW_TOKENS}, temperature=0.0, stream=True)
for i, piece in enumerate(out):
    if i == 0:
        sys.stdout.write("<first>"); sys.stdout.flush()
"""


def run_to_end(cmd: list[str], env: dict) -> dict:
    """Run cmd; → wall seconds to its first stdout byte and to its end, and its peak RSS (MB),
    reaping the child ourselves (so its rusage is ours to read)."""
    t0 = time.perf_counter()
    # (cwd: not a checkout — `python -c` puts the working directory before PYTHONPATH)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=tempfile.gettempdir())
    first = None
    out = b""
    while chunk := os.read(p.stdout.fileno(), 4096):
        if first is None:
            first = time.perf_counter() - t0
        out += chunk
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}")
    return {"first_byte_s": round(first or 0.0, 3), "total_s": round(time.perf_counter() - t0, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stdout": out.decode(errors="replace")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, help="a checkout of edgetok's code before the change, to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/footprint.json"))
    args = ap.parse_args()

    gguf = resolve_path("smollm2")
    tok = load_source("smollm2").tokenizer
    ids = tok.encode(texts.essays(20000))[: 1024 - NEW_TOKENS]
    work = Path(tempfile.mkdtemp(prefix="footprint-"))
    prompt = work / "prompt.txt"
    prompt.write_text(tok.decode(ids))
    llama_script = work / "llama.py"
    llama_script.write_text(LLAMA)

    here = Path(__file__).resolve().parent.parent
    codes = {"edgetok default": here} | ({"edgetok default (before)": args.before.resolve()} if args.before else {})
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cli = [sys.executable, "-c", "from edgetok.cli import main; main()", "run", "smollm2", "--no-chat",
           "--threads", str(THREADS)]
    systems = {}
    for name, code in codes.items():
        env = base_env | {"PYTHONPATH": str(code)}
        systems[f"{name} 1K"] = (cli + ["-f", str(prompt), "-n", str(NEW_TOKENS), "--json"], env)
        systems[f"{name} short"] = (cli + ["-p", SHORT, "-n", "16"], env)
    systems["llama.cpp 1K"] = ([sys.executable, str(llama_script), str(gguf), str(prompt)], base_env)
    systems["llama.cpp short"] = ([sys.executable, str(llama_script), str(gguf), str(work / "short.txt")], base_env)
    (work / "short.txt").write_text(SHORT)

    rows: dict[str, list[dict]] = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, (cmd, env) in systems.items():
            m = run_to_end(cmd, env)
            if name.endswith("1K") and name.startswith("edgetok"):
                stats = json.loads(m["stdout"])["stats"]
                m |= {"prompt_tokens": stats["prompt_tokens"], "ttft_in_process_s": round(stats["time_to_first_token_s"], 3)}
            m.pop("stdout")
            rows[name].append(m)
            print(r, name, m, file=sys.stderr)

    def med(name: str, key: str) -> str:
        xs = [m[key] for m in rows[name]]
        return f"{statistics.median(xs):.{1 if key == 'peak_rss_mb' else 2}f} ({min(xs):g}–{max(xs):g})"

    print("| system | peak RSS MB, 1K prompt + 64 tokens | first token s, short prompt (process start to first byte) |")
    print("|---|---|---|")
    for name in codes | {"llama.cpp": None}:
        print(f"| {name} | {med(name + ' 1K', 'peak_rss_mb')} | {med(name + ' short', 'first_byte_s')} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": THREADS, "new_tokens": NEW_TOKENS, "prompt_tokens": len(ids),
                                    "rounds": rows}, indent=1))


if __name__ == "__main__":
    main()
