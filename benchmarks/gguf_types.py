"""GGUF K-quant and iq4_nl files: edgetok's writer against llama.cpp's own quantizer, same source, same type.

    PYTHONPATH=. .venv/bin/python benchmarks/gguf_types.py --out bench-out/gguf-types [--model smollm2]

The source is MODEL written as an f32 GGUF by edgetok (llama.cpp's quantizer reads GGUFs); both
tools quantize that file. Per type, two pairs:

- pure: every 2-D tensor asked for the type (edgetok: write_gguf without overrides; llama.cpp:
  llama_model_quantize with pure=True). Each tool's own fallback applies to rows that are not whole
  blocks (llama.cpp: q4_k → q5_0, q5_k → q5_1, q6_k → q8_0; edgetok: → iq4_nl, q5_0, q8_0).
- mix: what each tool makes by default for the type: `edgetok export --quant T` (the output
  projection at q8_0) and llama.cpp's file type (Q4_K_S, Q5_K_S, Q6_K, IQ4_NL: its own upgrades
  of output / attn_v / ffn_down).
- matched: the same type for every tensor in both files, so the files are the same size and differ
  only in the codes each tool chose: edgetok writes each tensor at the type llama.cpp's "mix" file
  gave it (its upgrades and fallbacks included).

Every file runs in llama.cpp (llama-cpp-python) on texts of four kinds (prose, Python source,
legal text, this repository's Markdown), `--tokens` each; the reference is edgetok's fp32 torch
model of the source. Reported per file: size, bits per weight over the 2-D weights, KL mean (per
kind and overall), top-1 agreement, perplexity; and the seconds each tool took to quantize.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgetok.exporters import kquants
from edgetok.exporters.gguf import default_overrides, tensor_layout, write_gguf
from edgetok.exporters.verify import compare, model_logits
from edgetok.models.llama import LlamaModel
from edgetok.models.sources import load_source
from edgetok.runtimes.backends.llamacpp import llamacpp_logits
from edgetok.texts import essays

TYPES = {"q4_k": "Q4_K_S", "q5_k": "Q5_K_S", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL"}
ROOT = Path(__file__).resolve().parent.parent


def texts(tokenizer, n: int) -> dict[str, list[int]]:
    """n tokens of each kind of text (all real, all on this machine)."""
    import json as json_module
    import textwrap

    code = Path(textwrap.__file__).read_text() + Path(json_module.decoder.__file__).read_text()
    legal = Path("/usr/share/common-licenses/GPL-3").read_text()
    markdown = (ROOT / "docs" / "ARCHITECTURE.md").read_text() + (ROOT / "CONTRIBUTING.md").read_text()
    kinds = {"prose": essays(n * 8), "code": code, "legal": legal, "markdown": markdown}
    out = {}
    for kind, text in kinds.items():
        ids = tokenizer.encode(text)
        assert len(ids) >= n, (kind, len(ids))
        out[kind] = ids[:n]
    return out


def llamacpp_quantize(src: Path, out: Path, ftype_name: str, pure: bool, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = threads
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {out}")


def types_of(path: Path, src) -> dict[str, str]:
    """HF name → the type llama.cpp's file at `path` holds that tensor in (a stacked one: its first part)."""
    from gguf import GGUFReader

    layout = tensor_layout(src.config, src.weights)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the 'mix' files first (--mixes mix,matched)")
    return {layout[t.name]: t.tensor_type.name.lower() for t in GGUFReader(path).tensors}


def tensor_errors(f32: Path, ours: Path, theirs: Path) -> dict:
    """Relative squared error Σ(ŵ − w)² / Σw² of every tensor both files hold at the same K-quant
    or iq4_nl type, each file's blocks decoded by gguf-py: the codes each tool chose, compared
    directly (the model-level KL mixes every tensor's error)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    def decoded(path: Path) -> dict:
        return {t.name: t for t in GGUFReader(path).tensors}

    source, a, b = decoded(f32), decoded(ours), decoded(theirs)
    ratios, ours_total, theirs_total = [], 0.0, 0.0
    for name, t in a.items():
        u = b[name]
        if t.tensor_type != u.tensor_type or t.tensor_type.name.lower() not in kquants.TYPES:
            continue
        w = torch.from_numpy(np.array(source[name].data, dtype=np.float32)).flatten()
        norm = (w * w).sum().item()
        e_ours = ((torch.from_numpy(dequantize(t.data, t.tensor_type)).flatten() - w) ** 2).sum().item() / norm
        e_theirs = ((torch.from_numpy(dequantize(u.data, u.tensor_type)).flatten() - w) ** 2).sum().item() / norm
        ratios.append(e_ours / e_theirs)
        ours_total, theirs_total = ours_total + e_ours, theirs_total + e_theirs
    if not ratios:
        return {"tensors": 0}
    return {"tensors": len(ratios), "median_ratio": round(float(np.median(ratios)), 4),
            "edgetok_lower": round(sum(r < 1 for r in ratios) / len(ratios), 3),
            "mean_error_ratio": round(ours_total / theirs_total, 4)}


def weight_bits(path: Path) -> float:
    """Bits per weight over the file's 2-D tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    values = bytes_ = 0
    for t in reader.tensors:
        if len(t.shape) == 2:
            values += int(t.n_elements)
            bytes_ += int(t.n_bytes)
    return 8 * bytes_ / values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-out/gguf-types"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--mixes", default="pure,mix,matched")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    src = load_source(args.model)
    f32 = args.out / "source-f32.gguf"
    if not f32.exists():
        write_gguf(src, f32, "f32")
    model = LlamaModel.from_state_dict(src.config, src.weights)
    samples = texts(src.tokenizer, args.tokens)
    reference = {kind: model_logits(model, ids) for kind, ids in samples.items()}
    del model

    rows = []
    for kind in args.types.split(","):
        for mix in args.mixes.split(","):
            for tool in ("edgetok", "llama.cpp"):
                out = args.out / f"{tool}-{kind}-{mix}.gguf"
                start = time.perf_counter()
                if tool == "edgetok":
                    overrides = {"pure": {}, "mix": default_overrides(src.config, kind)}.get(mix)
                    if mix == "matched":
                        overrides = types_of(args.out / f"llama.cpp-{kind}-mix.gguf", src)
                    write_gguf(src, out, kind, overrides=overrides)
                elif mix == "matched":
                    continue  # its file is the "mix" one
                else:
                    llamacpp_quantize(f32, out, TYPES[kind], mix == "pure", args.threads)
                seconds = time.perf_counter() - start
                per_kind = {k: compare(reference[k], llamacpp_logits(out, ids, args.threads), ids).to_dict()
                            for k, ids in samples.items()}
                row = {"type": kind, "mix": mix, "tool": tool, "size_bytes": out.stat().st_size,
                       "bits_per_weight": round(weight_bits(out), 3), "quantize_seconds": round(seconds, 1),
                       "kl_mean": round(sum(p["kl_mean"] for p in per_kind.values()) / len(per_kind), 6),
                       "per_text": per_kind}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "per_text"}), flush=True)
                (args.out / "results.json").write_text(json.dumps(rows, indent=2))

    if "matched" in args.mixes:
        print("\n| type | tensors at the same type | edgetok / llama.cpp error: median | mean | edgetok lower on |")
        print("|---|---|---|---|---|")
        for kind in args.types.split(","):
            e = tensor_errors(f32, args.out / f"edgetok-{kind}-matched.gguf", args.out / f"llama.cpp-{kind}-mix.gguf")
            rows.append({"type": kind, "tensor_errors": e})
            if e["tensors"]:
                print(f"| {kind} | {e['tensors']} | {e['median_ratio']:.3f} | {e['mean_error_ratio']:.3f} "
                      f"| {e['edgetok_lower']:.0%} |")
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
        rows = [r for r in rows if "tool" in r]

    kinds = list(samples)
    print("\n| type | mix | tool | size MB | bits/weight | KL mean | " + " | ".join(f"KL {k}" for k in kinds)
          + " | top-1 (prose) | quantize s |")
    print("|---" * (8 + len(kinds)) + "|")
    for r in rows:
        per = r["per_text"]
        print(f"| {r['type']} | {r['mix']} | {r['tool']} | {r['size_bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} "
              f"| {r['kl_mean']:.4f} | " + " | ".join(f"{per[k]['kl_mean']:.4f}" for k in kinds)
              + f" | {per['prose']['top1_agreement']:.1%} | {r['quantize_seconds']:.0f} |")


if __name__ == "__main__":
    main()
