"""Size against KL: edgetok's bit-budget allocator at several targets vs llama.cpp's standard mixes.

    PYTHONPATH=. .venv/bin/python benchmarks/allocator.py --out bench-out/allocator --stage STAGE [--model smollm2]

Stages (each one lock hold; results accumulate in OUT/results.json):

- sensitivity: the allocator's measurement, once: KL of the model with one matrix at one type
  (its input rounded as llama.cpp rounds it for that type), for every matrix and type
  (exporters/sensitivity.py, on the calibration text's 256 tokens, or `--calib-tokens`), saved to
  OUT/sensitivity.json; and edgetok's calibrated imatrix (OUT/imatrix.gguf, 8192 tokens of the
  calibration text), which llama.cpp's "+ imatrix" mixes use.
- llamacpp: llama.cpp's quantizer (llama_model_quantize) makes Q4_0, Q4_1, Q4_K_M, Q5_K_M and Q8_0 from
  the model's f32 GGUF, each without and with edgetok's imatrix.
- edgetok: `--targets` bits per weight: the allocator's types from the saved sensitivity, as
  `edgetok export --target-bits` chooses them (exporters/gguf.py's allocate_types: the mixes
  predicted lowest and the source's own types measured whole on the calibration text, as many
  `--calib-tokens` as the sensitivity took), written by edgetok's GGUF writer, which keeps the
  source's blocks where a matrix keeps its source's type.

Every file runs in llama.cpp on four kinds of text (prose, Python source, legal text, Markdown),
`--tokens` each (benchmarks/gguf_types.py's texts; the calibration text, the end of the essays,
is none of them); the reference is edgetok's fp32 torch model of the source. Reported: file size,
bits per weight over the 2-D weights, KL per kind and its mean; `--stage table` prints them and
plots OUT/size_vs_kl-MODEL.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.gguf_types import texts, weight_bits
from edgetok.exporters.allocate import calibration_rounded
from edgetok.exporters.gguf import allocate_types, allocation_matrices, calibrated_imatrix, write_gguf, writer_round_trip
from edgetok.exporters.gguf_codes import source_blocks
from edgetok.exporters.gguf_types import input_rounding
from edgetok.exporters.imatrix import read_imatrix
from edgetok.exporters.llamacpp_quantize import quantize_with_llamacpp
from edgetok.exporters.options import GgufOptions
from edgetok.exporters.sensitivity import tensor_kl
from edgetok.exporters.verify import compare, model_logits
from edgetok.files import progress_bar
from edgetok.models.llama import LlamaModel
from edgetok.models.sources import load_source
from edgetok.runtimes.backends.llamacpp import llamacpp_logits

MIXES = ("Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q8_0")


def measure(out: Path, samples: dict, reference: dict, threads: int) -> dict:
    per_kind = {k: compare(reference[k], llamacpp_logits(out, ids, threads), ids).to_dict() for k, ids in samples.items()}
    return {"size_bytes": out.stat().st_size, "bits_per_weight": round(weight_bits(out), 3),
            "kl_mean": round(sum(p["kl_mean"] for p in per_kind.values()) / len(per_kind), 6),
            "per_text": {k: p["kl_mean"] for k, p in per_kind.items()},
            "top1_prose": per_kind["prose"]["top1_agreement"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-out/allocator"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--stage", choices=("sensitivity", "llamacpp", "edgetok", "table"), required=True)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-tokens", type=int, default=None,
                    help="sensitivity, edgetok: calibration tokens per KL run (default: export's 256; give both stages the same); "
                         "the imatrix keeps its 8192")
    ap.add_argument("--targets", default="4.6,4.9,5.3,5.7,6.5,8.5")
    ap.add_argument("--mixes", default=",".join(MIXES))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    results_path = args.out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []

    src = load_source(args.model)
    matrices = allocation_matrices(src.config, src.weights, {})
    stored = source_blocks(src.path, src.config)  # kept where a matrix keeps its type, as the export keeps them
    if args.stage == "sensitivity":
        start = time.perf_counter()
        options = GgufOptions(model=args.model, output=args.out / "x.gguf", target_bits=8)
        sensitivity_options = GgufOptions(model=args.model, output=args.out / "x.gguf", target_bits=8,
                                          calib_tokens=args.calib_tokens)
        kl = tensor_kl(calibration_rounded(src, sensitivity_options, input_rounding)[0], matrices, writer_round_trip({}, stored),
                       progress_bar("sensitivity"))
        (args.out / "sensitivity.json").write_text(json.dumps(kl, indent=1))
        print(f"sensitivity: {sum(len(v) for v in kl.values())} runs on {sensitivity_options.allocation_tokens} tokens "
              f"in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        calibrated_imatrix(src, options).write(args.out / "imatrix.gguf")
        print(f"imatrix: {time.perf_counter() - start:.0f} s")
        return
    if args.stage == "table":
        print("| model | file | size MB | bits/weight | KL mean | " + " | ".join(f"KL {k}" for k in rows[0]["per_text"]) + " |")
        print("|---" * (5 + len(rows[0]["per_text"])) + "|")
        for r in sorted(rows, key=lambda r: (r["model"], r["bits_per_weight"])):
            print(f"| {r['model']} | {r['file']} | {r['size_bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} | "
                  f"{r['kl_mean']:.4f} | " + " | ".join(f"{v:.4f}" for v in r["per_text"].values()) + " |")
        from edgetok.bench.plots import size_vs_kl

        for model in sorted({r["model"] for r in rows}):
            print(size_vs_kl([r for r in rows if r["model"] == model], f"{model}: size against KL, llama.cpp runs every file",
                             args.out / f"size_vs_kl-{model}.png"))
        return

    samples = texts(src.tokenizer, args.tokens)
    model = LlamaModel.from_state_dict(src.config, src.weights)
    reference = {kind: model_logits(model, ids) for kind, ids in samples.items()}
    del model
    made, chose = [], {}
    if args.stage == "llamacpp":
        f32 = args.out / "source-f32.gguf"
        if not f32.exists():
            write_gguf(src, f32, "f32")
        imatrix = read_imatrix(args.out / "imatrix.gguf")
        for mix in args.mixes.split(","):
            for im in (None, imatrix):
                name = f"llama.cpp {mix}" + (" + imatrix" if im else "")
                out = args.out / (name.replace(" ", "_").replace("+_", "") + ".gguf")
                quantize_with_llamacpp(f32, out, mix, im, args.threads)
                made.append((name, out))
    else:
        kl = json.loads((args.out / "sensitivity.json").read_text())
        for target in map(float, args.targets.split(",")):
            options = GgufOptions(model=args.model, output=args.out / "x.gguf", target_bits=target, calib_tokens=args.calib_tokens)
            allocation = allocate_types(src, options, {}, {}, stored, sensitivity=kl)
            out = args.out / f"edgetok-{target:g}.gguf"
            types = allocation.types
            write_gguf(src, out, max(set(types.values()), key=list(types.values()).count), types, stored=stored)
            made.append((f"edgetok --target-bits {target:g}", out))
            chose[made[-1][0]] = {"chosen": allocation.chosen, "calibration_kl": round(allocation.calibration_kl, 6),
                                  "tried": [t.to_json() for t in allocation.tried]}
    for name, out in made:
        row = {"model": args.model, "file": name, **measure(out, samples, reference, args.threads), **chose.get(name, {})}
        rows = [r for r in rows if (r["model"], r["file"]) != (args.model, name)] + [row]
        results_path.write_text(json.dumps(rows, indent=2))
        print(json.dumps({k: v for k, v in row.items() if k not in ("per_text", "tried")}), flush=True)
        out.unlink()  # the files are large; the numbers are kept


if __name__ == "__main__":
    main()
