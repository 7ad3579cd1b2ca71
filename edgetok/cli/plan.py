"""`edgetok plan`: what fits a device, and what it will cost, with the arithmetic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click


@click.command("plan")
@click.argument("model")
@click.option("--device", default="local", show_default=True,
              help="a profile from `edgetok devices`, local (this machine, measured), or a profile .json file")
@click.option("--context", type=click.IntRange(min=1), default=None, help="tokens of context to plan for (default: the model's)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores for local, else 1)")
@click.option("--kv-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="local: the folder whose disk speed is measured (where --kv-disk will point)")
@click.option("--json", "as_json", is_flag=True, help="print the plan as one JSON object")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also save the plan (its JSON) to this file, whole or not at all: `edgetok run --plan FILE` applies it")
def command(model, device, context, threads, kv_dir, as_json, out):
    """Choose the engine, weights, KV budget, tiers and KV bits that fit DEVICE, and predict peak memory
    and decode speed; refuse in one sentence when nothing fits."""
    from edgetok.devices import load_profile
    from edgetok.devices.planner import plan
    from edgetok.files import write_json_atomic
    from edgetok.models.sources import OPTIMUM, load_source

    profile = load_profile(device, kv_dir)
    threads = threads or (os.cpu_count() if device == "local" else 1)
    source = load_source(model, progress=True)
    p = plan(source.config, profile, context, threads)
    saved = p.to_dict() | {"model": model, "run_options": p.run_options()}
    if out is not None:
        write_json_atomic(out, saved)
    if as_json:
        click.echo(json.dumps(saved, indent=2))
        return
    click.echo(f"{model} on {p.device}, {p.context} tokens of context:")
    click.echo(f"  engine {p.engine} ({p.execution_provider}), {p.weights} weights, {p.threads} threads, "
               f"KV budget {p.kv_budget}, KV bits {p.kv_bits}"
               + (f", tiers: device {p.kv_device_mb:g} MB, host {p.kv_host_mb:g} MB"
                  + (", disk" if p.kv_disk else "") if p.kv_device_mb is not None else ""))
    peak = (f"peak {p.predicted_peak_host_bytes / 2**20:.0f} MB (RSS)" if p.shared_memory else
            f"peak {p.predicted_peak_device_bytes / 2**20:.0f} MB device, {p.predicted_peak_host_bytes / 2**20:.0f} MB host")
    click.echo(f"  predicted: {peak}; decode {p.predicted_decode_tokens_per_s:g} tok/s")
    for line in p.arithmetic:
        click.echo(f"  · {line}")
    # The plan runs the default ONNX export: `edgetok run` builds it by itself
    if source.format == OPTIMUM:
        click.echo("  (an optimum export runs as optimum wrote it, with the exact KV cache: edgetok run does not apply "
                   "this plan to it)")
    elif source.format != "onnx":
        click.echo(f"  (edgetok run builds {model}'s ONNX export on first use, once: "
                   f"{'its GGUF codes' if source.format == 'gguf' else 'int4'}, float activations)")
    click.echo(f"  run with: edgetok run {model} " + (f"--plan {out}" if out is not None else " ".join(p.run_options())))
