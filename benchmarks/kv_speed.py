"""Decode speed and memory at long contexts: edgetok full attention, edgetok's tiered cache
(all in RAM — with fp32 or int8 weights — and squeezed into small tiers over disk), and llama.cpp,
in one interleaved run.

    .venv/bin/python benchmarks/kv_speed.py --context 8000 --new-tokens 64 --repeat 2 [--onnx DIR ...]

Every system is a separate `edgetok run ... --json` process (so peak RSS is its own) on the same
real-text prompt (no chat template), greedy, with the same thread count; rounds interleave the
systems (A B C D A B C D) so drift hits all alike. llama.cpp runs the same SmolLM2 GGUF through
llama-cpp-python (`--backend llamacpp`). `--onnx DIR` adds an ONNX export on the onnxruntime
backend: full attention, tiered in RAM and tiered over disk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import edgetok
from edgetok.texts import essays

EDGETOK = str(Path(sys.executable).parent / "edgetok")


def systems(disk: str, budget: str, onnx: list[str]) -> dict[str, list[str]]:
    """name → `edgetok run` arguments: the model, then options."""
    tiers = ["--kv-budget", budget, "--kv-device-mb", "16", "--kv-host-mb", "64", "--kv-disk", disk]
    out = {
        "edgetok full attention": ["smollm2"],
        f"edgetok tiered {budget} (RAM)": ["smollm2", "--kv-budget", budget],
        f"edgetok tiered {budget} (RAM), int8 weights": ["smollm2", "--kv-budget", budget, "--weights", "int8"],
        f"edgetok tiered {budget} (16 MB device, 64 MB host, disk)": ["smollm2", *tiers],
        f"edgetok tiered {budget} (16 MB device, 64 MB host, disk), no prefetch": ["smollm2", *tiers, "--kv-prefetch", "off"],
    }
    for folder in onnx:  # an ONNX export, on the onnxruntime backend
        name = f"edgetok onnx {Path(folder).name}"
        out |= {f"{name} full attention": [folder], f"{name} tiered {budget} (RAM)": [folder, "--kv-budget", budget],
                f"{name} tiered {budget} (16 MB device, 64 MB host, disk)": [folder, *tiers]}
    return out | {"llama.cpp (llama-cpp-python)": ["smollm2", "--backend", "llamacpp"]}


def essay_prompt(context: int) -> tuple[Path, Path]:
    """A fresh work folder, and in it prompt.txt: `context` tokens of the essays (no chat template)."""
    tok = edgetok.load("smollm2").tokenizer
    ids = tok.encode(essays(context * 6), add_special_tokens=False)[:context]
    workdir = Path(tempfile.mkdtemp(prefix="edgetok-bench-"))
    prompt_file = workdir / "prompt.txt"
    prompt_file.write_text(tok.decode(ids))
    return workdir, prompt_file


def decode_args(repeat: int, threads: int | None, threads_help: str | None = None) -> argparse.ArgumentParser:
    """The arguments of a long-context decode benchmark (this script's and kv_prefetch.py's)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--repeat", type=int, default=repeat)
    ap.add_argument("--threads", type=int, default=threads, help=threads_help)
    return ap


def main() -> None:
    ap = decode_args(repeat=2, threads=os.cpu_count())
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only the systems whose name has one")
    ap.add_argument("--onnx", action="append", default=[], metavar="DIR",
                    help="an ONNX export (edgetok export --format onnx) to run too: full, tiered in RAM, tiered over disk")
    args = ap.parse_args()

    workdir, prompt_file = essay_prompt(args.context)
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.repeat):
        chosen = systems(str(workdir / "kv"), args.budget, args.onnx)
        if args.only:
            chosen = {n: e for n, e in chosen.items() if any(o in n for o in args.only.split(","))}
        for name, extra in chosen.items():
            cmd = [EDGETOK, "run", extra[0], "-f", str(prompt_file), "--no-chat", "-n", str(args.new_tokens),
                   "--threads", str(args.threads), "--json", *extra[1:]]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"{name} failed: {p.stderr.strip()}")
            out = json.loads(p.stdout)
            runs.setdefault(name, []).append(out)
            print(f"round {round_ + 1} {name}: {out['stats']['decode_tokens_per_s']} tok/s", file=sys.stderr, flush=True)

    rows = []
    def median_decode(name: str) -> float:
        return statistics.median(r["stats"]["decode_tokens_per_s"] for r in runs[name]) if name in runs else float("nan")

    llama = median_decode("llama.cpp (llama-cpp-python)")
    full = median_decode("edgetok full attention")  # (the torch reference's)
    for name, rs in runs.items():
        decode = [r["stats"]["decode_tokens_per_s"] for r in rs]
        kv = rs[-1]["stats"].get("kv", {})
        rows.append({
            "system": name,
            "prompt_tokens": rs[-1]["prompt_tokens"],
            "decode_tok_s": statistics.median(decode),
            "decode_min_max": [min(decode), max(decode)],
            "prefill_tok_s": statistics.median(r["stats"]["prefill_tokens_per_s"] for r in rs),
            "peak_rss_mb": round(max(r["stats"]["peak_rss_bytes"] for r in rs) / 2**20),
            "vs_llamacpp": round(statistics.median(decode) / llama, 2),
            "vs_full": round(statistics.median(decode) / full, 2),
            "kv_read_per_token": kv.get("bytes_read_per_token"),
            "kv_resident": kv.get("resident_bytes"),
            "budget_used": kv.get("budget_used"),
        })
    print("| system | decode tok/s (min–max) | × llama.cpp | × full | prefill tok/s | peak RSS MB | KV read/token (device/host/disk) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        read = r["kv_read_per_token"]
        read_s = "/".join(f"{read[t] / 2**20:.1f} MB" for t in ("device", "host", "disk")) if read else "–"
        print(f"| {r['system']} | {r['decode_tok_s']:.1f} ({r['decode_min_max'][0]:.1f}–{r['decode_min_max'][1]:.1f}) "
              f"| {r['vs_llamacpp']:.2f} | {r['vs_full']:.2f} | {r['prefill_tok_s']:.0f} | {r['peak_rss_mb']} | {read_s} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
