"""`edgetok export`: a compressed artifact with a parity report against the fp32 reference.

The flags are exporters/options.py's fields (`--block-size` is OnnxOptions.block_size):
`export_options` builds OnnxOptions or GgufOptions from them as they are, and the pipeline
(exporters/pipeline.py) does the rest; `--format hf` is a plain writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgetok.errors import EdgetokError
from edgetok.exporters import options as export_choices


def _int_or_none(ctx, param, value):
    """Choices given as text on the command line ("32") are numbers in the options."""
    return None if value is None else int(value)


@click.command("export")
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["gguf", "hf", "onnx"]), required=True,
              help="gguf: llama.cpp's format; onnx: a folder for ONNX Runtime; hf: a Hugging Face folder (fp32)")
@click.option("--quant", type=click.Choice(export_choices.QUANTS), default=None,
              help="GGUF tensor type of the weight matrices (a K-quant where rows are whole 256-value blocks, else "
                   "the nearest 32-value type: the plan is printed and kept in the report); auto: each matrix's type "
                   "chosen from its measured sensitivity for --target-bits or --max-kl [default: q8_0, or auto "
                   "with --target-bits]")
@click.option("--weights", type=click.Choice(export_choices.WEIGHTS), default=None,
              help="ONNX weights: int4/int8 as MatMulNBits blocks (or DequantizeLinear with --qdq); auto: each "
                   "matrix at 4 or 8 bits or float, chosen for --target-bits or --max-kl; source: a GGUF's own codes, "
                   "carried without rounding again (4-bit codes at 4 bits, 5-8-bit codes at 8) [default: int4, "
                   "or auto with --target-bits]")
@click.option("--target-bits", type=click.FloatRange(min=1, max=32), default=None,
              help="the allocator's budget: at most this many bits per weight over the weight matrices, each "
                   "matrix's type chosen from its measured sensitivity (implies --quant / --weights auto)")
@click.option("--block-size", type=click.Choice([str(b) for b in export_choices.BLOCK_SIZES]), default=None,
              callback=_int_or_none,
              help="ONNX int4/int8: weights per scale along the input (default 32; int8 --qdq: per channel)")
@click.option("--qdq", is_flag=True, help="ONNX: standard DequantizeLinear + MatMul only (for NPU execution providers)")
@click.option("--zero-points", type=click.Choice(export_choices.ZERO_POINTS), default="exact", show_default=True,
              help="ONNX int4: each block's exact minimum (a small MatMul per linear adds it), or integer zero points "
                   "(onnxruntime-genai's: fewer nodes, less exact)")
@click.option("--head-bits", type=click.Choice([str(b) for b in export_choices.HEAD_BITS]), default="8", show_default=True,
              callback=_int_or_none, help="ONNX int4: bits of the embedding and LM head (one tied matrix)")
@click.option("--activations", type=click.Choice(export_choices.ACTIVATIONS), default="int8", show_default=True,
              help="ONNX int4/int8: the layers' activations in MatMulNBits — int8 is fastest; float keeps the fp32 "
                   "reference's near-ties (~15% slower decode)")
@click.option("--opset", type=click.IntRange(min=export_choices.MIN_OPSET), default=export_choices.DEFAULT_OPSET,
              show_default=True, help="ONNX opset")
@click.option("--attention", type=click.Choice(export_choices.ATTENTION), default=None,
              help="ONNX: gqa = ONNX Runtime's fused kernels (default), standard = default-domain operators only (default with --qdq)")
@click.option("--prune-after-layer", type=click.IntRange(min=0), default=None,
              help="ONNX: the layer after which the graph can prune a prompt, for edgetok run --prune-prompt "
                   "(none by default: decoding is ~10% faster without)")
@click.option("--genai", is_flag=True,
              help="ONNX: a folder onnxruntime-genai runs (onnxruntime_genai.Model(folder)): its KV inputs and outputs, "
                   "genai_config.json and the tokenizer files, standard and com.microsoft operators only; edgetok "
                   "runs the same export made without --genai")
@click.option("--max-kl", type=click.FloatRange(min=0), default=None,
              help="fail (and write nothing) if the parity report's mean KL exceeds this; with --quant / --weights "
                   "auto, the allocator's goal instead: the cheapest mix meeting it on the calibration text")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="the file (gguf) or folder (onnx, hf) to write")
@click.option("--force", is_flag=True, help="overwrite an existing file")
@click.option("--keep-sensitive", is_flag=True, help="keep the tensors quantization hurts most at higher precision")
@click.option("--tensor-type", multiple=True, metavar="REGEX=TYPE",
              help="GGUF: the weight matrices whose llama.cpp name REGEX finds (e.g. 'attn_v|ffn_down=q8_0') get TYPE; "
                   "repeatable, the first match decides; a REGEX that finds none is an error")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="GGUF: llama.cpp's importance matrix (its GGUF or legacy .dat layout) weighting the K-quant and "
                   "iq4_nl rounding of the matrices it names")
@click.option("--save-imatrix", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="GGUF: also write the importance edgetok calibrates (Σx² of every linear's inputs on --calib) as "
                   "a llama.cpp imatrix (.dat: the legacy layout, else GGUF), for llama-quantize --imatrix")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="text for the parity report (default: the built-in essays)")
@click.option("--eval-tokens", type=click.IntRange(min=export_choices.MIN_EVAL_TOKENS), default=None,
              help="parity report length (gguf 512, onnx 1024)")
@click.option("--verify/--no-verify", default=True, show_default=True, help="measure the parity report")
@click.option("--method", type=click.Choice(export_choices.METHODS), default="rtn", show_default=True,
              help="how weight codes are chosen: rtn rounds to nearest; gptq and rsq (rotated, importance-weighted "
                   "GPTQ) calibrate on text (gguf: their codes on the grid of --quant q4_0, q5_0, q8_0, q4_k, q5_k, q6_k or "
                   "iq4_nl)")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="calibration text for gptq/rsq and the allocator (default: the built-in essays)")
@click.option("--calib-tokens", type=click.IntRange(min=export_choices.MIN_EVAL_TOKENS), default=None,
              help="calibration tokens: gptq/rsq, in sequences of 512 (default 32768); the allocator "
                   f"(default {export_choices.ALLOCATION_TOKENS})")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def command(fmt, as_json, **kw):
    """Export MODEL to a compressed artifact, with a parity report against the fp32 reference."""
    if fmt != "onnx" and (kw["attention"] or kw["prune_after_layer"] is not None or kw["zero_points"] != "exact"
                          or kw["head_bits"] != 8 or kw["activations"] != "int8" or kw["genai"]):
        raise EdgetokError("--attention, --prune-after-layer, --zero-points, --head-bits, --activations and --genai "
                           "apply to --format onnx")
    if fmt != "gguf" and (kw["tensor_type"] or kw["imatrix"] or kw["save_imatrix"]):
        raise EdgetokError("--tensor-type, --imatrix and --save-imatrix apply to --format gguf")
    if fmt == "hf" and kw["target_bits"] is not None:
        raise EdgetokError("--target-bits applies to quantized formats (gguf, onnx), not hf")
    if fmt == "hf":
        _export_hf(kw)
        return
    from edgetok.exporters.pipeline import export as run_export

    options = export_options(fmt, kw)
    manifest = run_export(options)
    if as_json:
        click.echo(json.dumps(manifest.to_json(), indent=2))
    elif fmt == "onnx":
        _print_onnx_export(options, manifest)
    else:
        _print_gguf_export(options, manifest)


def export_options(fmt: str, kw: dict):
    """`edgetok export`'s arguments → OnnxOptions or GgufOptions, which check them: the fields are
    named as the flags; the other format's flags are left out (as before, they are ignored)."""
    import dataclasses

    from edgetok.exporters.options import GgufOptions, OnnxOptions

    cls = OnnxOptions if fmt == "onnx" else GgufOptions
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kw.items() if k in fields})


def _export_hf(kw: dict) -> None:
    """A plain writer: the fp32 weights as they are, no options to check but these."""
    if kw["method"] != "rtn" or kw["calib"] or kw["calib_tokens"]:
        raise EdgetokError("--method, --calib and --calib-tokens apply to quantized formats (gguf, onnx), not hf")
    from edgetok.exporters.hf import export_hf_folder
    from edgetok.models.sources import load_source

    export_hf_folder(load_source(kw["model"], progress=True), kw["output"], force=kw["force"])
    click.echo(f"wrote {kw['output']}")


def _print_onnx_export(o, manifest) -> None:
    from edgetok.models.manifest import ONNX_MANIFEST

    form = "DequantizeLinear (QDQ)" if o.qdq else "MatMulNBits" if o.quantized else "float"
    click.echo(f"wrote {o.output} ({manifest.size_bytes / 1e6:.1f} MB, {o.weights} {o.method}, {form}, "
               f"{manifest.export_seconds:.0f} s)")
    _print_allocation(manifest)
    if manifest.parity_summary is not None:
        click.echo(f"parity vs fp32: {manifest.parity_summary}")
    click.echo(f"report: {o.output / ONNX_MANIFEST}")
    if o.genai:
        click.echo(f"runs in onnxruntime-genai: onnxruntime_genai.Model('{o.output}')")


def _print_allocation(manifest) -> None:
    from collections import Counter

    if manifest.allocation is None:
        return
    click.echo(manifest.allocation["summary"])
    counts = Counter(manifest.allocation["types"].values())
    click.echo("  matrices: " + ", ".join(f"{n} at {kind}" for kind, n in counts.most_common()))


def _print_gguf_export(o, manifest) -> None:
    from collections import Counter

    from edgetok.exporters.gguf_types import TensorType, plan_summary
    from edgetok.models.manifest import gguf_report_path

    click.echo(f"wrote {o.output} ({manifest.size_bytes / 1e6:.1f} MB, {o.quant}, {o.method})")
    for line in plan_summary([TensorType(**t) for t in manifest.type_plan or []]):
        click.echo(line)
    if manifest.tensor_types:
        counts = Counter(manifest.tensor_types.values())
        click.echo("  by --tensor-type: " + ", ".join(f"{n} tensors at {kind}" for kind, n in counts.items()))
    for name, kind in manifest.kept_at_higher_precision.items():
        kl = (manifest.sensitivity_kl or {}).get(name)
        click.echo(f"  kept at {kind}: {name}" + (f" (KL when quantized alone {kl:.4f})" if kl is not None else " (output projection)"))
    _print_allocation(manifest)
    if manifest.parity_summary is not None:
        click.echo(f"parity vs fp32: {manifest.parity_summary}")
    if manifest.imatrix is not None:
        click.echo(f"  rounding weighted by {o.imatrix} ({manifest.imatrix['tensors_weighted']} matrices)")
    if o.save_imatrix is not None:
        click.echo(f"imatrix: {o.save_imatrix}")
    click.echo(f"report: {gguf_report_path(o.output)}")
