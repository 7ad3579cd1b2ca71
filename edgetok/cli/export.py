"""`edgetok export`: a compressed artifact with a parity report against the fp32 reference."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgetok.errors import EdgetokError


@click.command("export")
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["gguf", "hf", "onnx"]), required=True,
              help="gguf: llama.cpp's format; onnx: a folder for ONNX Runtime; hf: a Hugging Face folder (fp32)")
@click.option("--quant", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]),
              default="q8_0", show_default=True, help="GGUF tensor type of the weight matrices")
@click.option("--weights", "onnx_weights", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="int4", show_default=True,
              help="ONNX weights: int4/int8 as MatMulNBits blocks (or DequantizeLinear with --qdq)")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default=None,
              help="ONNX int4/int8: weights per scale along the input (default 32; int8 --qdq: per channel)")
@click.option("--qdq", is_flag=True, help="ONNX: standard DequantizeLinear + MatMul only (for NPU execution providers)")
@click.option("--zero-points", type=click.Choice(["exact", "integer"]), default="exact", show_default=True,
              help="ONNX int4: each block's exact minimum (a small MatMul per linear adds it), or integer zero points "
                   "(onnxruntime-genai's: fewer nodes, less exact)")
@click.option("--head-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="ONNX int4: bits of the embedding and LM head (one tied matrix)")
@click.option("--opset", type=click.IntRange(min=18), default=21, show_default=True, help="ONNX opset")
@click.option("--attention", type=click.Choice(["gqa", "standard"]), default=None,
              help="ONNX: gqa = ONNX Runtime's fused kernels (default), standard = default-domain operators only (default with --qdq)")
@click.option("--prune-after-layer", "export_prune_layer", type=click.IntRange(min=0), default=None,
              help="ONNX: the layer after which the graph can prune a prompt, for edgetok run --prune-prompt (none by default: decoding is ~10% faster without)")
@click.option("--max-kl", type=click.FloatRange(min=0), default=None,
              help="ONNX: fail (and write nothing) if the parity report's mean KL exceeds this")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="the file (gguf) or folder (onnx, hf) to write")
@click.option("--force", is_flag=True, help="overwrite an existing file")
@click.option("--keep-sensitive", is_flag=True, help="keep the tensors quantization hurts most at higher precision")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="text for the parity report (default: the built-in essays)")
@click.option("--eval-tokens", type=click.IntRange(min=16), default=None, help="parity report length (gguf 512, onnx 1024)")
@click.option("--no-verify", is_flag=True, help="skip the parity report")
@click.option("--method", type=click.Choice(["rtn", "gptq", "rsq"]), default="rtn", show_default=True,
              help="how weight codes are chosen: rtn rounds to nearest; gptq and rsq (rotated, importance-weighted "
                   "GPTQ) calibrate on text (gguf: --quant q4_0 or q8_0)")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="calibration text for gptq/rsq (default: the built-in essays)")
@click.option("--calib-tokens", type=click.IntRange(min=512), default=None,
              help="calibration tokens for gptq/rsq, in sequences of 512 (default 32768)")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def command(model, fmt, quant, onnx_weights, block_size, qdq, zero_points, head_bits, opset, attention, export_prune_layer,
           max_kl, output, force, keep_sensitive, eval_text, eval_tokens, no_verify, method, calib, calib_tokens, threads,
           as_json):
    """Export MODEL to a compressed artifact, with a parity report against the fp32 reference."""
    if fmt != "onnx" and (attention or export_prune_layer is not None or zero_points != "exact" or head_bits != "8"):
        raise EdgetokError("--attention, --prune-after-layer, --zero-points and --head-bits apply to --format onnx")
    if fmt == "hf" and (method != "rtn" or calib or calib_tokens):
        raise EdgetokError("--method, --calib and --calib-tokens apply to quantized formats (gguf, onnx), not hf")
    if fmt == "onnx":
        from edgetok.exporters.onnx import export_onnx

        manifest = export_onnx(
            model, output, onnx_weights, block_size=int(block_size) if block_size else None, qdq=qdq, opset=opset,
            force=force, verify=not no_verify, max_kl=max_kl, eval_text=eval_text, eval_tokens=eval_tokens or 1024,
            threads=threads, method=method, calib=calib, calib_tokens=calib_tokens, attention=attention,
            prune_after_layer=export_prune_layer, zero_points=zero_points, head_bits=int(head_bits),
        )
        if as_json:
            click.echo(json.dumps(manifest, indent=2))
            return
        form = "DequantizeLinear (QDQ)" if qdq else "MatMulNBits" if onnx_weights in ("int4", "int8") else "float"
        click.echo(f"wrote {output} ({manifest['size_bytes'] / 1e6:.1f} MB, {onnx_weights} {method}, {form}, "
                   f"{manifest['export_seconds']:.0f} s)")
        if "parity_summary" in manifest:
            click.echo(f"parity vs fp32: {manifest['parity_summary']}")
        click.echo(f"report: {output / 'edgetok.json'}")
        return
    if fmt == "hf":
        from edgetok.exporters.hf import export_hf_folder
        from edgetok.models.sources import load_source

        export_hf_folder(load_source(model, progress=True), output, force=force)
        click.echo(f"wrote {output}")
        return
    from edgetok.exporters.export import export_gguf_verified

    manifest = export_gguf_verified(
        model, output, quant, force=force, keep_sensitive=keep_sensitive, verify=not no_verify,
        eval_text=eval_text, eval_tokens=eval_tokens or 512, threads=threads,
        method=method, calib=calib, calib_tokens=calib_tokens,
    )
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    click.echo(f"wrote {output} ({manifest['size_bytes'] / 1e6:.1f} MB, {quant}, {method})")
    for name, kind in manifest.get("kept_at_higher_precision", {}).items():
        kl = manifest.get("sensitivity_kl", {}).get(name)
        click.echo(f"  kept at {kind}: {name}" + (f" (KL when quantized alone {kl:.4f})" if kl is not None else " (output projection)"))
    if "parity_summary" in manifest:
        click.echo(f"parity vs fp32: {manifest['parity_summary']}")
    click.echo(f"report: {output}.json")
