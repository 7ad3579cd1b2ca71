"""The mixed-bit attention op alone: one layer's decode attention over a SmolLM2-shaped selection
(3 KV heads, 9 query heads, head_dim 64, 2048 selected tokens = 8K at a 25 % budget), per width,
native kernel vs the torch reference (dequantize, concatenate, SDPA), at 1 and 2 threads.

    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/mixed_attention_kernel.py --out benchmarks/results/mixed_attention_kernel.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgetok.kernels import mixed_attention
from edgetok.runtimes.kv.codec import attend_reference, encode, kernel_row

HKV, G, D, TOKENS = 3, 3, 64, 2048


def per_call_s(fn, seconds: float = 1.0) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(HKV * G, 1, D, generator=gen)
    window = torch.randn(HKV, 16, D, generator=gen).to(torch.bfloat16)
    rows = []
    for bits, chunk in ((16, 32), (16, 128), (8, 128), (4, 128), (2, 128)):
        forms = [encode(torch.randn(HKV, chunk, D, generator=gen), torch.randn(HKV, chunk, D, generator=gen), bits)
                 for _ in range(TOKENS // chunk)]
        table = np.array([kernel_row(*f) for f in forms] + [mixed_attention.float_row(window, window, causal=True)])
        kv_bytes = sum(t.nbytes for f in forms for t in f[0].values())
        row = {"bits": bits, "chunk": chunk, "kv_bytes": kv_bytes,
               "reference_us": round(per_call_s(lambda f=forms: attend_reference(q, f, window, window)) * 1e6, 1)}
        for threads in (1, 2):
            s = per_call_s(lambda t=table, n=threads: mixed_attention.attend(q, t, HKV, threads=n))
            row[f"native_{threads}t_us"] = round(s * 1e6, 1)
            row[f"native_{threads}t_gb_s"] = round(kv_bytes / s / 1e9, 2)
        rows.append(row)
        print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"isa": mixed_attention.isas()[0], "shape": {"hkv": HKV, "group": G, "head_dim": D, "tokens": TOKENS},
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
