"""MatMulQ4 (edgetok's ONNX Runtime operator) vs ONNX Runtime's MatMulNBits on the same 4-bit codes.

One graph per kernel: a chain of SmolLM2-sized linears (576 → 1536 → 576, repeated), so the weights
do not stay in cache between calls, as in a decoder; microseconds per node, best of 5 × 20 runs,
at the row counts a decoder sends (1: decode; 2–8: drafts, batched clients; 64, 512: prefill).
MatMulNBits level 0 takes float activations (the same arithmetic as MatMulQ4), level 4 quantizes
them to int8 per block (faster, but what flips the fp32 reference's near-ties).

    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/matmul_q4.py [--pairs 60] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from edgetok.kernels import ort_ops

KERNELS = {"MatMulQ4": None, "MatMulNBits float (level 0)": 0, "MatMulNBits int8 (level 4)": 4}
ROWS = (1, 2, 4, 8, 64, 512)
HIDDEN, INNER, BLOCK = 576, 1536, 32


def chain(kernel: str, pairs: int, threads: int, rng) -> ort.InferenceSession:
    inits, nodes, x = [], [], "A"
    for i in range(pairs):
        for j, (k, n) in enumerate([(HIDDEN, INNER), (INNER, HIDDEN)]):
            q = rng.integers(0, 16, (n, k // BLOCK, BLOCK), dtype=np.uint8)
            packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
            scales = (rng.random((n, k // BLOCK)) * 0.01).astype(np.float32)
            offsets = (rng.standard_normal((k // BLOCK, n)) * 1e-3).astype(np.float32)
            name, y = f"w{i}.{j}", ("Y" if (i, j) == (pairs - 1, 1) else f"y{i}.{j}")
            tensors = [(f"{name}.q", TensorProto.UINT8, packed), (f"{name}.scales", TensorProto.FLOAT, scales)]
            if KERNELS[kernel] is None:
                tensors.append((f"{name}.offsets", TensorProto.FLOAT, offsets))
                nodes.append(helper.make_node(ort_ops.MATMUL_Q4, [x] + [t[0] for t in tensors], [y],
                                              domain=ort_ops.DOMAIN, K=k, N=n, block_size=BLOCK))
            else:
                nodes.append(helper.make_node("MatMulNBits", [x] + [t[0] for t in tensors], [y], domain="com.microsoft",
                                              K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=KERNELS[kernel]))
            inits += [helper.make_tensor(nm, t, a.shape, a.tobytes(), raw=True) for nm, t, a in tensors]
            x = y
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, None, HIDDEN])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, None, HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ort_ops.DOMAIN, 1),
                                                    helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    ort_ops.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=60, help="576→1536→576 pairs in the chain (60: 53 MB of codes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts, comma-separated (a draft of k: k + 1)")
    ap.add_argument("--kernels", default=",".join(KERNELS), help="which of: " + ", ".join(KERNELS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/matmul_q4.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sessions = {k: chain(k, args.pairs, args.threads, rng) for k in args.kernels.split(",")}
    nodes = 2 * args.pairs
    results = {}
    for rows in map(int, args.rows.split(",")):
        a = rng.standard_normal((1, rows, HIDDEN)).astype(np.float32)
        reps = 20 if rows <= 8 else 3
        for kernel, session in sessions.items():  # interleaved: each row count runs every kernel
            session.run(None, {"A": a})
            best = min(_timed(session, a, reps) for _ in range(5))
            results.setdefault(str(rows), {})[kernel] = round(best / nodes * 1e6, 1)
        print(rows, results[str(rows)], flush=True)
    args.out.write_text(json.dumps({"pairs": args.pairs, "threads": args.threads, "us_per_node": results,
                                    "isa": ort_ops.isa()}, indent=2) + "\n")


def _timed(session, a, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        session.run(None, {"A": a})
    return (time.perf_counter() - t) / reps


if __name__ == "__main__":
    main()
