"""The planner against measurements: for the plans it picks, predicted vs measured peak RSS and decode speed.

For each context (1K / 4K / 8K) it plans SmolLM2 for this machine (`local`, measured on the spot,
2 threads), saves the plan, and runs it exactly as a user would — `edgetok run smollm2 --plan FILE`,
in a process of its own (edgetok.bench.forced: the run options, every one of the 64 new tokens
decoded) — on (context − 64) tokens of the essays. One more cell plans for a synthetic profile
(this machine with less memory than the whole cache needs at 8K) and checks that the plan uses
tiers and that the run's measured peak RSS stays inside the profile's memory.

    python benchmarks/planner.py --cells 1024,4096 [--repeat 2] [--out benchmarks/results/planner.json]

Each cell runs while it holds the machine's benchmark lock (edgetok/bench/lock.py); repeats of
the cells are interleaved, so a busy moment of the shared machine hits every cell alike. Results
accumulate in --out (cells already there are kept unless run again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from edgetok.bench.harness import prompt_tokens
from edgetok.bench.lock import bench_lock
from edgetok.bench.record import write_ids
from edgetok.devices.catalog import local_profile
from edgetok.devices.planner import plan
from edgetok.files import write_json_atomic
from edgetok.models.sources import load_source

NEW_TOKENS = 64
THREADS = 2
# The synthetic profile: this machine's speeds, with memory that holds the runtime, the weights and
# the prefill workspace at 8K, but only part of the whole fp32 KV cache (360 MB for SmolLM2 at 8K)
SYNTHETIC_GB = 1.0


def measure(model: str, plan_file: Path, ids_file: Path) -> dict:
    """One `edgetok run --plan FILE` in a fresh process: its stats."""
    cmd = [sys.executable, "-m", "edgetok.bench.forced", model, "--prompt-ids", str(ids_file), "-n", str(NEW_TOKENS),
           "--plan", str(plan_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])["stats"]


def cell(model: str, name: str, work: Path) -> dict:
    source = load_source(model)
    profile = local_profile(work, probe_mb=64)
    context = 8192 if name == "synthetic" else int(name)
    if name == "synthetic":
        profile = replace(profile, name=f"synthetic-{SYNTHETIC_GB:g}gb", device_memory_gb=SYNTHETIC_GB,
                          host_memory_gb=SYNTHETIC_GB,
                          description=f"this machine's measured speeds with {SYNTHETIC_GB:g} GB of memory")
    p = plan(source.config, profile, context, THREADS)
    plan_file = work / f"plan-{name}.json"
    write_json_atomic(plan_file, p.to_dict())
    ids_file = work / f"ids-{context}.json"
    write_ids(ids_file, prompt_tokens(source.tokenizer, context - NEW_TOKENS))
    stats = measure(model, plan_file, ids_file)
    peak, speed = stats["peak_rss_bytes"], stats["decode_tokens_per_s"]
    return {
        "cell": name, "context": context, "device": profile.name,
        "profile_memory_bytes": round(profile.host_memory_gb * 1e9),
        "plan": {k: v for k, v in p.to_dict().items() if k != "arithmetic"}, "arithmetic": p.arithmetic,
        "measured_peak_rss_bytes": peak, "measured_decode_tokens_per_s": speed,
        "peak_error": round(p.predicted_peak_host_bytes / peak - 1, 4),
        "decode_error": round(p.predicted_decode_tokens_per_s / speed - 1, 4),
        "kv": {k: stats["kv"].get(k) for k in ("kind", "budget", "storage_bits", "bytes_read_per_token",
                                               "resident_bytes", "disk_wait_s")} if stats.get("kv") else {},
    }


def table(rows: list[dict]) -> str:
    mb = 1 << 20
    lines = ["| cell | plan | predicted peak RSS | measured | error | predicted decode | measured | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["plan"]
        tiers = (f"tiers: device {p['kv_device_mb']:g} MB, host {p['kv_host_mb']:g} MB" + (", disk" if p["kv_disk"] else "")
                 if p["kv_device_mb"] is not None else "no tiers")
        lines.append(
            f"| {r['cell']} ({r['context']}) | {p['kv_budget']}, bits {p['kv_bits']}, {tiers} | "
            f"{p['predicted_peak_host_bytes'] / mb:.0f} MiB | {r['measured_peak_rss_bytes'] / mb:.0f} MiB | "
            f"{100 * r['peak_error']:+.0f} % | {p['predicted_decode_tokens_per_s']:.1f} tok/s | "
            f"{r['measured_decode_tokens_per_s']:.1f} tok/s | {100 * r['decode_error']:+.0f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--cells", default="1024,4096,8192,synthetic")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/planner.json"))
    args = ap.parse_args()
    done = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    names = args.cells.split(",")
    done["runs"] = [r for r in done["runs"] if r["cell"] not in names]
    with tempfile.TemporaryDirectory(prefix="edgetok-planner-") as tmp:
        for _ in range(args.repeat):
            for name in names:
                with bench_lock():
                    row = cell(args.model, name, Path(tmp))
                print(json.dumps({k: row[k] for k in ("cell", "peak_error", "decode_error")}), flush=True)
                done["runs"].append(row)
    done["machine"] = "2-core Xeon shared with other jobs (each cell held the benchmark lock)"
    write_json_atomic(args.out, done)
    print(table(done["runs"]))


if __name__ == "__main__":
    main()
