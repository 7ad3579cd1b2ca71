"""The bench's results as text (markdown tables for stdout and BENCHMARKS.md) and results.json,
with the machine and the versions that produced them."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgetok.bench import optimum_env
from edgetok.files import write_json_atomic

PACKAGES = ("edgetok", "torch", "llama_cpp_python", "onnxruntime", "onnxruntime-genai", "transformers", "numpy")
TIERS = ("device", "host", "disk")


def machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version()}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    out["optimum-onnx"] = optimum_env.found_version()  # (in its own environment)
    return out


def write_results(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    write_json_atomic(path, results)
    return path


def _kv_mb(resident: dict[str, int] | None) -> str:
    if not resident:
        return "–"
    values = [resident.get(t, 0) / 2**20 for t in TIERS if t in resident]
    return "/".join(f"{v:.1f}" for v in values)


def _speed(s: dict[str, float], digits: int = 1) -> str:
    if s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def results_table(results: dict[str, Any]) -> str:
    lines = [
        "| context | system | prefill tok/s | decode tok/s (min–max) | TTFT s | peak RSS MB "
        "| KV resident MB (device/host/disk) | greedy agreement | KL mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["results"]:
        head = f"| {r['context']} | {r['system']} "
        if not r["runs"]:
            lines.append(head + (f"| failed: {r['error']} " if r["error"] else "| not run ") + "| | | | | | |")
            continue
        q = r["quality"]
        reference = r["system"] == results["systems"][0]["name"]
        agree, kl = (f"{q['greedy_agreement']:.1%}", f"{q['kl_mean']:.4f}") if q else ("(reference)" if reference else "–", "–")
        lines.append(
            head + f"| {r['prefill_tokens_per_s']['median']:.0f} | {_speed(r['decode_tokens_per_s'])} "
            f"| {r['time_to_first_token_s']['median']:.2f} | {r['peak_rss_bytes'] / 2**20:.0f} "
            f"| {_kv_mb(r['kv_resident_bytes'])} | {agree} | {kl} |"
        )
    for label, why in results.get("skipped", {}).items():
        lines.append(f"\nskipped {label}: {why}")
    return "\n".join(lines)


def disk_table(results: dict[str, Any]) -> str:
    """The runs with a disk tier: what decode read from it (empty when none had one)."""
    rows = [r for r in results["results"] if r.get("kv_disk")]
    if not rows:
        return ""
    lines = ["| context | system | disk reads (sync) | chunks prefetched | disk wait s | prefetch read s "
             "| bytes/token read (device/host/disk) | process read MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["kv_disk"]
        per = d["bytes_read_per_token"] or {}
        io = "–" if d["process_read_bytes"] is None else f"{d['process_read_bytes'] / 1e6:.1f}"
        lines.append(f"| {r['context']} | {r['system']} | {d['sync_disk_reads']} | {d['prefetch_chunks']} | {d['disk_wait_s']:.3f} "
                     f"| {d['prefetch_read_s']:.3f} | {'/'.join(str(per.get(t, 0)) for t in ('device', 'host', 'disk'))} | {io} |")
    return "\n".join(lines)


def ratios_table(results: dict[str, Any]) -> str:
    """edgetok ÷ peer: decode at every context, then prefill at every context."""
    contexts = results["settings"]["contexts"]
    pairs: dict[tuple[str, str], dict[int, dict]] = {}
    for x in results["ratios"]:
        pairs.setdefault((x["edgetok"], x["peer"]), {})[x["context"]] = x
    if not pairs:
        return ""
    head = ["edgetok system", "peer"] + [f"decode ×, {c}" for c in contexts] + [f"prefill ×, {c}" for c in contexts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (e, p), by_ctx in pairs.items():
        cells = [f"{by_ctx[c][k]:.2f}" if c in by_ctx else "–" for k in ("decode", "prefill") for c in contexts]
        lines.append(f"| {e} | {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
