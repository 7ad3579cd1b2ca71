"""Per-token decode cost of the tiered cache, split into weights, KV read (the mixed-bit attention
op), selection and the rest, against this machine's measured memory bandwidth.

    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/attention_costs.py --contexts 1024,8192 --budget 25% \
        --out benchmarks/results/attention_costs.json
    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/attention_costs.py --backend onnxruntime \
        --contexts 1024,8192 --budget 25% --out benchmarks/results/attention_costs_default.json

torch: each phase is timed around the cache's own calls (Storage.attend, TieredCache._select and the
step's start); "weights and the rest" is the forward's remaining time: the matmuls that read every
weight once per token, norms, RoPE, sampling.
onnxruntime (the default engine, slabs in RAM): the native step times its own parts inside the
graph's run (stats' native_ms_per_step: selection, attention, the sampled captured-mass measurement);
"weights and the rest" is the run's remaining time (MatMulQ4 reads every weight, the other
operators); "python" is the step's time outside the run (the cache's bookkeeping, sampling).
onnxruntime with --tiers: every layer's chunks are selected and read from the tiers before the run
(selection, tier_read: the reads and their table rows); the run holds the weights and the op's KV read.
The bandwidth floor of each part is its bytes over the bandwidth a large copy reaches
(edgetok/devices/local.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from edgetok import api
from edgetok.devices.local import memory_bandwidth
from edgetok.runtimes.kv import KVConfig, TieredCache
from edgetok.runtimes.kv.storage import Storage, TieredStorage
from edgetok.texts import essays

SPENT = Counter()


def timed(cls, name: str, key: str) -> None:
    """Accumulate the seconds spent in cls.name under SPENT[key] (this script's measurement only)."""
    inner = getattr(cls, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[key] += time.perf_counter() - t0

    setattr(cls, name, wrapper)


def time_decode_runs(backend) -> None:
    """Accumulate the seconds of the graph's runs in single-token forwards (decode) under SPENT["graph_run"]."""
    forward, run = backend.forward, backend.session.run_with_iobinding
    decoding = [False]

    def timed_forward(tokens, *args, **kwargs):
        decoding[0] = len(tokens) == 1
        return forward(tokens, *args, **kwargs)

    def timed_run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            if decoding[0]:
                SPENT["graph_run"] += time.perf_counter() - t0

    backend.forward, backend.session.run_with_iobinding = timed_forward, timed_run


def measure(model, context: int, new_tokens: int) -> dict:
    ids = model.tokenizer.encode(essays(context * 6))[: context - new_tokens]
    prompt = model.tokenizer.decode(ids)
    SPENT.clear()  # (the timed calls run in decode only: prefill attends exactly through other paths)
    result = model.generate(prompt, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    s = result.stats
    steps = max(s.decode_steps, 1)
    total = s.decode_s / steps * 1e3
    per_token = {k: round(v / steps * 1e3, 3) for k, v in SPENT.items()}
    native = s.kv.get("native_ms_per_step")
    if native:  # the default engine: the graph's run, and the native step's parts inside it
        run = per_token.pop("graph_run") * steps / max(s.decode_steps, 1)
        per_token = {"selection": native["select"], "kv_read_attention": native["attend"],
                     "captured_mass_measurement": native["measure"],
                     "python": round(total - run, 3)}
        per_token["weights_and_rest"] = round(run - native["select"] - native["attend"] - native["measure"], 3)
    elif "graph_run" in per_token:  # the default engine over tiers: chunks selected and read before the run
        run = per_token.pop("graph_run")
        per_token = {"selection": per_token.get("selection_ahead", 0.0), "tier_read": per_token.get("tier_read", 0.0),
                     "weights_and_kv_read_in_run": run}
        per_token["python"] = round(total - sum(per_token.values()), 3)
    else:
        per_token.pop("graph_run", None)
        per_token["weights_and_rest"] = round(total - sum(per_token.values()), 3)
    model.reset()
    return {"context": context, "prompt_tokens": s.prompt_tokens, "decode_ms_per_token": round(total, 3),
            "decode_tok_s": round(s.decode_tokens_per_s, 2), "ms_per_token": per_token, "kv": s.kv,
            "peak_rss_mb": s.peak_rss_bytes >> 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,8192")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiers", action="store_true", help="16 MB device, 64 MB host, the rest on disk")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                    help="onnxruntime: the default engine (its SmolLM2 export, slabs in RAM)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    timed(Storage, "attend", "kv_read_attention")
    timed(TieredCache, "_select", "selection")
    timed(TieredCache, "_begin_step", "step_start")
    timed(TieredCache, "_select_ahead", "selection_ahead")  # (over tiers, the default engine: before the run)
    timed(TieredStorage, "step_rows", "tier_read")
    bandwidth = memory_bandwidth(256)
    tiers = dict(device_mb=16, host_mb=64, disk_dir=Path(tempfile.mkdtemp())) if args.tiers else {}
    model = api.load("smollm2", backend="torch" if args.backend == "torch" else None,  # (None: the default engine)
                     threads=args.threads, kv=KVConfig(budget=args.budget, **tiers))
    assert model.engine.backend.name == args.backend, model.choice
    backend = model.engine.backend
    if args.backend == "torch":
        weight_bytes = sum(p.numel() * p.element_size() for p in backend.model.parameters())
    else:  # the export's files: its int4 weights (and scales), read once per token
        weight_bytes = sum(f.stat().st_size for f in model.source.path.iterdir() if f.suffix in (".onnx", ".data"))
        time_decode_runs(backend)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        row = measure(model, context, args.new_tokens)
        kv_bytes = sum(row["kv"]["bytes_read_per_token"].values())
        row["floor_ms"] = {"weights": round(weight_bytes / bandwidth * 1e3, 3), "kv_read": round(kv_bytes / bandwidth * 1e3, 3)}
        row["kv_bytes_read_per_token"] = kv_bytes
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("context", "decode_ms_per_token", "ms_per_token", "floor_ms", "kv_bytes_read_per_token")}))
    out = {"bandwidth_bytes_per_s": bandwidth, "weight_bytes": weight_bytes, "budget": args.budget, "tiers": args.tiers,
           "threads": args.threads, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
