"""Weight quantization quality on SmolLM2-135M: rtn vs gptq vs rsq at int4.

    .venv/bin/python benchmarks/quant_quality.py --out bench-out/quant

Fake quantization: each method's codes for the decoder linears (q/k/v/o/gate/up/down), dequantized
and put into edgetok's torch reference model (embedding and head stay fp32), compared with the fp32
model on held-out text — the start of the built-in essays; calibration reads their end (32768
tokens, 64 × 512, by default). Reported: perplexity of the text, top-1 agreement and mean KL
against fp32, and the packed size of the quantized linears (4-bit codes, fp16 scales, 4-bit zeros
when asymmetric). Scales are fp16 values, as every artifact stores them.

With --gguf, the symmetric group-32 codes are also written as q4_0 GGUFs (the tied embedding, or
the untied rotated head, at q8_0 as llama.cpp's own mixes keep it) and run in llama.cpp, beside
llama.cpp's own q4_0 rounding: the file sizes and the numbers an `edgetok export` user gets.

With --gguf-types T,… (q4_k, iq4_nl, …), per type: llama.cpp's own file type for T (Q4_K_S,
IQ4_NL, …: `llama_model_quantize` from the model's f32 GGUF, without and with edgetok's calibrated
imatrix, 8192 tokens of the essays' end), then edgetok's rtn / gptq / rsq codes written with
**llama.cpp's type for every tensor** ("matched": the same bytes per tensor, only the codes differ;
rsq's untied head at the embedding's type) and as `edgetok export --quant T --method M` writes
them ("edgetok's mix": its own fallbacks, the output projection at q8_0). Same 2048 held-out tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgetok.exporters.quantize import QuantizedModel, quantize_model, quantized_source
from edgetok.exporters.verify import compare, model_logits
from edgetok.models.llama import LlamaModel
from edgetok.models.sources import load_source
from edgetok.texts import essays


def linears_bytes(qm: QuantizedModel) -> int:
    total = 0
    for qw in qm.quantized().values():
        n, k = qw.shape
        groups = n * (k // qw.group_size)
        total += n * k * qw.bits // 8 + groups * 2 + (0 if qw.symmetric else groups * qw.bits // 8)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-out/quant"))
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--methods", default="rtn,gptq,rsq", help="also: rotate (rsq without the token importance)")
    ap.add_argument("--configs", default="32a,128a,32s,128s",
                    help="group size + a(symmetric), s(ymmetric: ±absmax) or q (q4_0's own grid: signed scales)")
    ap.add_argument("--gguf", action="store_true",
                    help="also write q4_0 GGUFs of the 32s / 32q codes and run them in llama.cpp")
    ap.add_argument("--gguf-types", default="", help="GGUF types (q4_k, iq4_nl, …): gptq / rsq on each type's grid "
                    "against llama.cpp's own quantizer, in llama.cpp")
    ap.add_argument("--plans", default="matched,mix", help="--gguf-types' edgetok files: llama.cpp's types (matched), "
                    "edgetok's own (mix)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    src = load_source("smollm2")
    all_ids = src.tokenizer.encode(essays(10**9))
    tokens = src.tokenizer.encode(essays(args.eval_tokens * 8))[: args.eval_tokens]
    assert all_ids[: len(tokens)] == tokens and len(tokens) + args.calib_tokens <= len(all_ids), "eval and calibration overlap"
    reference = model_logits(LlamaModel.from_state_dict(src.config, src.weights), tokens)

    rows = []
    for config in filter(None, args.configs.split(",")):
        group, kind = int(config[:-1]), config[-1]
        symmetric, signed = kind in "sq", kind == "q"
        for method in args.methods.split(","):
            start = time.perf_counter()
            qm = quantize_model(src, 4, group, "rsq" if method == "rotate" else method, None, args.calib_tokens,
                                symmetric=symmetric, scale_dtype=torch.float16, signed_scale=signed,
                                importance=method != "rotate")
            seconds = time.perf_counter() - start
            model = LlamaModel.from_state_dict(qm.config, qm.dequantized())
            report = compare(reference, model_logits(model, tokens), tokens)
            label = "q4_0 grid" if signed else "sym" if symmetric else "asym"
            row = {"config": f"int4 g{group} {label}", "method": method,
                   "group_sizes": qm.info["group_sizes"], "seconds": round(seconds, 1),
                   "linears_mb": round(linears_bytes(qm) / 1e6, 2), **report.to_dict()}
            if args.gguf and config in ("32s", "32q"):
                row["gguf"] = gguf_row(src, qm, tokens, args.out / f"smollm2-q4_0-{config}-{method}.gguf")
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    if args.gguf:
        rows.append({"config": "int4 g32 sym", "method": "llama.cpp q4_0 rounding",
                     "gguf": gguf_row(src, None, tokens, args.out / "smollm2-q4_0-llamacpp.gguf")})
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    for kind in filter(None, args.gguf_types.split(",")):
        for row in type_rows(src, kind, tokens, reference, args):
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print_tables(rows, reference_ppl=compare(reference, reference, tokens).perplexity_reference, eval_tokens=len(tokens))


def gguf_row(src, qm: QuantizedModel | None, tokens: list[int], path: Path) -> dict:
    from edgetok.exporters.gguf import default_overrides, export_gguf
    from edgetok.exporters.verify import reference_logits
    from edgetok.runtimes.backends.llamacpp import llamacpp_logits

    written = src if qm is None else quantized_source(src, qm)
    export_gguf(written, path, "q4_0", force=True, overrides=default_overrides(written.config, "q4_0"),
                quantized=None if qm is None else qm.quantized())
    report = compare(reference_logits(src, tokens), llamacpp_logits(path, tokens), tokens)
    return {"size_mb": round(path.stat().st_size / 1e6, 1), **report.to_dict()}


LLAMACPP_TYPE = {"q4_k": "Q4_K_S", "q5_k": "Q5_K_S", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL"}  # its file type for each


def type_rows(src, kind: str, tokens: list[int], reference: torch.Tensor, args):
    """Rows of GGUF files of type `kind` run in llama.cpp: llama.cpp's own (± imatrix), then
    edgetok's rtn / gptq / rsq with llama.cpp's types and with its own (see the module's doc)."""
    from benchmarks.gguf_types import types_of
    from edgetok.exporters.gguf import calibrated_imatrix, default_overrides, export_gguf, write_gguf
    from edgetok.exporters.gguf_types import choose_type
    from edgetok.exporters.imatrix import read_imatrix
    from edgetok.exporters.llamacpp_quantize import quantize_with_llamacpp
    from edgetok.exporters.options import GgufOptions
    from edgetok.models.names import EMBEDDING, LM_HEAD
    from edgetok.runtimes.backends.llamacpp import llamacpp_logits

    def run(path: Path) -> dict:
        report = compare(reference, llamacpp_logits(path, tokens), tokens)
        return {"size_mb": round(path.stat().st_size / 1e6, 1), **report.to_dict()}

    f32, imatrix_path = args.out / "source-f32.gguf", args.out / "imatrix.gguf"
    if not f32.exists():
        write_gguf(src, f32, "f32")
    if not imatrix_path.exists():
        calibrated_imatrix(src, GgufOptions(model="smollm2", output=args.out / "x.gguf", target_bits=8)).write(imatrix_path)
    mix = LLAMACPP_TYPE[kind]
    for imatrix in (None, read_imatrix(imatrix_path)):
        path = args.out / f"llama.cpp-{mix}{'-imatrix' if imatrix else ''}.gguf"
        quantize_with_llamacpp(f32, path, mix, imatrix)
        yield {"type": kind, "file": f"llama.cpp {mix}" + (" + imatrix" if imatrix else ""), "method": "llama.cpp",
               "gguf": run(path)}
    matched = types_of(args.out / f"llama.cpp-{mix}.gguf", src)
    linears = {n for n in src.weights if ".layers." in n and src.weights[n].dim() == 2}
    plans = {"matched": lambda name, shape: matched[name], "edgetok's mix": lambda name, shape: choose_type(name, shape, kind).type}
    for plan, type_of in plans.items():
        if ("matched" if plan == "matched" else "mix") not in args.plans.split(","):
            continue
        for method in ("rtn", "gptq", "rsq"):
            start = time.perf_counter()
            qm = None if method == "rtn" else quantize_model(src, method=method, calib_tokens=args.calib_tokens,
                                                              gguf_type=type_of)
            seconds = time.perf_counter() - start
            written = src if qm is None else quantized_source(src, qm)
            if plan == "matched":
                overrides = {n: t for n, t in matched.items() if qm is None or n not in linears}
                if LM_HEAD in written.weights and not written.config.tie_word_embeddings:
                    overrides[LM_HEAD] = matched[EMBEDDING]  # rsq's untied head: as the embedding
            else:
                overrides = default_overrides(written.config, kind)
            path = args.out / f"edgetok-{kind}-{'matched' if plan == 'matched' else 'mix'}-{method}.gguf"
            export_gguf(written, path, kind, force=True, overrides=overrides,
                        quantized=None if qm is None else qm.quantized())
            row = {"type": kind, "file": f"edgetok {method}, {plan}", "method": method, "calibration_s": round(seconds),
                   "gguf": run(path)}
            if qm is not None:
                fake = model_logits(LlamaModel.from_state_dict(qm.config, qm.dequantized()), tokens)
                row["fake_quant_kl"] = round(compare(reference, fake, tokens).kl_mean, 6)
            yield row


def print_tables(rows: list[dict], reference_ppl: float, eval_tokens: int) -> None:
    print(f"\nfp32 reference perplexity {reference_ppl:.3f} over {eval_tokens} held-out tokens\n")
    print("| weights | method | perplexity | top-1 agreement | KL mean | linears MB | calibration s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "perplexity" in r:
            print(f"| {r['config']} | {r['method']} | {r['perplexity']:.3f} | {r['top1_agreement']:.1%} | "
                  f"{r['kl_mean']:.4f} | {r['linears_mb']:.1f} | {r['seconds']:.0f} |")
    gguf = [r for r in rows if "gguf" in r and "type" not in r]
    if gguf:
        print("\n| q4_0 GGUF codes | file MB | llama.cpp perplexity | top-1 agreement | KL mean |")
        print("|---|---|---|---|---|")
        for r in gguf:
            g = r["gguf"]
            print(f"| {r['config']}, {r['method']} | {g['size_mb']:.1f} | {g['perplexity']:.3f} | "
                  f"{g['top1_agreement']:.1%} | {g['kl_mean']:.4f} |")
    typed = [r for r in rows if "type" in r]
    if typed:
        print("\n| type | file | file MB | llama.cpp perplexity | top-1 agreement | KL mean | fake-quant KL |")
        print("|---|---|---|---|---|---|---|")
        for r in typed:
            g, fake = r["gguf"], r.get("fake_quant_kl")
            print(f"| {r['type']} | {r['file']} | {g['size_mb']:.1f} | {g['perplexity']:.3f} | {g['top1_agreement']:.1%} | "
                  f"{g['kl_mean']:.4f} | {'' if fake is None else f'{fake:.4f}'} |")


if __name__ == "__main__":
    main()
