"""Does the tiered cache's prefetch hide disk reads? Decode at 8K with the cache squeezed into
16 MB device + 64 MB host + a disk file, with and without prefetch, with the disk file in the page
cache (reads are memcpys) and read past it (`--kv-disk-uncached`: each read goes to the storage
device, as for a cache larger than RAM).

    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/kv_prefetch.py --context 8000 --new-tokens 64 --repeat 3 --threads 1
    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/kv_prefetch.py --context 8000 --new-tokens 64 --repeat 2 --threads 2 \
        --only "no prefetch,last 3 steps,auto" --out benchmarks/results/kv_prefetch_auto.json   # (session 15: --kv-prefetch auto)

Every system is a separate `edgetok run ... --json` process on the same real-text prompt (no chat
template), greedy, rounds interleaved (A B C … A B C …). Per decoded token it reports: the model
thread's time blocked on the disk (synchronous reads plus waits on unfinished prefetches), the
prefetch thread's read time (hidden behind compute unless waited on), the prefetch hit rate (disk
chunks attention read that the prefetch had already read), the disk chunks' bytes attention read,
the bytes prefetched and not used, what the process read from the storage device
(/proc/self/io read_bytes: ≈ 0 when the file sits in the page cache), and the CPU seconds decode
spent (all threads, and the model's thread alone), which other processes on the machine do not
stretch as they stretch wall time.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from kv_speed import decode_args, essay_prompt  # benchmarks/kv_speed.py

EDGETOK = str(Path(sys.executable).parent / "edgetok")


def systems(disk: str, budget: str) -> dict[str, list[str]]:
    """name → extra `edgetok run` arguments."""
    tiers = ["--kv-budget", budget, "--kv-device-mb", "16", "--kv-host-mb", "64", "--kv-disk", disk]

    def steps(n: int) -> list[str]:  # how many past steps' selections the prefetch reads (default 3)
        return ["--kv-prefetch-steps", str(n)]

    return {
        "page cache, no prefetch": tiers + ["--kv-prefetch", "off"],
        "page cache, prefetch last 3 steps' chunks": tiers + ["--kv-prefetch", "on"] + steps(3),
        "page cache, prefetch last 8 steps' chunks": tiers + ["--kv-prefetch", "on"] + steps(8),
        "page cache, prefetch auto": tiers + ["--kv-prefetch", "auto"],
        "uncached, no prefetch": tiers + ["--kv-disk-uncached", "--kv-prefetch", "off"],
        "uncached, prefetch last step's chunks": tiers + ["--kv-disk-uncached", "--kv-prefetch", "on"] + steps(1),
        "uncached, prefetch last 3 steps' chunks": tiers + ["--kv-disk-uncached", "--kv-prefetch", "on"] + steps(3),
        "uncached, prefetch last 8 steps' chunks": tiers + ["--kv-disk-uncached", "--kv-prefetch", "on"] + steps(8),
        "uncached, prefetch auto": tiers + ["--kv-disk-uncached", "--kv-prefetch", "auto"],
    }


def row(name: str, runs: list[dict]) -> dict:
    def med(f):
        return statistics.median(f(r) for r in runs)

    def per_token(f):
        return med(lambda r: f(r["stats"]["kv"]) / max(r["stats"]["kv"]["decode_steps"], 1))

    decode = [r["stats"]["decode_tokens_per_s"] for r in runs]
    kv = runs[-1]["stats"]["kv"]
    return {
        "system": name,
        "rounds": len(runs),
        "prompt_tokens": runs[-1]["prompt_tokens"],
        "decode_tok_s": statistics.median(decode),
        "decode_min_max": [min(decode), max(decode)],
        "disk_wait_ms_per_token": 1000 * per_token(lambda k: k["disk_wait_s"]),
        "sync_read_ms_per_token": 1000 * per_token(lambda k: k["sync_read_s"]),
        "prefetch_wait_ms_per_token": 1000 * per_token(lambda k: k["prefetch_wait_s"]),
        "prefetch_read_ms_per_token": 1000 * per_token(lambda k: k["prefetch_read_s"]),
        "hit_rate": med(lambda r: r["stats"]["kv"]["prefetch_hits"]
                        / max(r["stats"]["kv"]["prefetch_hits"] + r["stats"]["kv"]["sync_disk_reads"], 1)),
        "disk_mb_per_token": med(lambda r: r["stats"]["kv"]["bytes_read_per_token"]["disk"]) / 2**20,
        "unused_prefetch_mb_per_token": per_token(lambda k: k["prefetch_unused_bytes"]) / 2**20,
        "device_read_mb_per_token": per_token(lambda k: k["process_read_bytes"] or 0) / 2**20,
        "cpu_ms_per_token": 1000 * per_token(lambda k: k["decode_cpu_s"]),
        "model_thread_cpu_ms_per_token": 1000 * per_token(lambda k: k["decode_model_thread_cpu_s"]),
        "kv_read_per_token": kv["bytes_read_per_token"],
        "runs": [r["stats"] for r in runs],
    }


def main() -> None:
    ap = decode_args(repeat=3, threads=1, threads_help="torch threads of each run (the prefetch thread is extra)")
    ap.add_argument("--disk-dir", type=Path, default=None,
                    help="folder for the disk tier's file (default: a temporary folder; put it on the disk to measure)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows (and every run's stats) as JSON")
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only the systems whose name has one")
    args = ap.parse_args()

    workdir, prompt_file = essay_prompt(args.context)
    disk = str(args.disk_dir or workdir / "kv")
    chosen = systems(disk, args.budget)
    if args.only:
        chosen = {n: e for n, e in chosen.items() if any(o in n for o in args.only.split(","))}
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.repeat):
        for name, extra in chosen.items():
            cmd = [EDGETOK, "run", "smollm2", "-f", str(prompt_file), "--no-chat", "-n", str(args.new_tokens),
                   "--threads", str(args.threads), "--json"] + extra
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"{name} failed: {p.stderr.strip()}")
            out = json.loads(p.stdout)
            runs.setdefault(name, []).append(out)
            kv = out["stats"]["kv"]
            steps = max(kv["decode_steps"], 1)
            print(f"round {round_ + 1} {name}: {out['stats']['decode_tokens_per_s']} tok/s, "
                  f"disk wait {1000 * kv['disk_wait_s'] / steps:.2f} ms/token, "
                  f"prefetch read {1000 * kv['prefetch_read_s'] / steps:.2f} ms/token", file=sys.stderr, flush=True)

    rows = [row(name, rs) for name, rs in runs.items()]
    print(f"| {args.context} tokens, {args.budget}, --threads {args.threads} | decode tok/s (min–max) "
          "| disk wait ms/token (sync + prefetch wait) | prefetch read ms/token | prefetch hit rate "
          "| disk chunks MB/token | unused prefetch MB/token | read from device MB/token "
          "| CPU ms/token (all threads / model thread) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['decode_tok_s']:.2f} ({r['decode_min_max'][0]:.2f}–{r['decode_min_max'][1]:.2f}) "
              f"| {r['disk_wait_ms_per_token']:.2f} ({r['sync_read_ms_per_token']:.2f} + {r['prefetch_wait_ms_per_token']:.2f}) "
              f"| {r['prefetch_read_ms_per_token']:.2f} | {100 * r['hit_rate']:.0f} % | {r['disk_mb_per_token']:.2f} "
              f"| {r['unused_prefetch_mb_per_token']:.2f} | {r['device_read_mb_per_token']:.2f} "
              f"| {r['cpu_ms_per_token']:.0f} / {r['model_thread_cpu_ms_per_token']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
