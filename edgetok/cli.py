"""The `edgetok` command line: run, chat, inspect."""

from __future__ import annotations

import errno
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from edgetok.errors import EdgetokError
from edgetok.exporters import options as export_choices

LONG_PROMPT = 1024  # tokens: longer prompts get a prefill progress bar


def main() -> None:
    cli()  # standalone: click turns its own errors, Ctrl-C and broken pipes into exit codes


class _Group(click.Group):
    def invoke(self, ctx):
        # A user error is one sentence on stderr and exit 1, never a traceback.
        try:
            return super().invoke(ctx)
        except EdgetokError as e:
            message = str(e)
        except OSError as e:  # full disk, unreadable file, ...
            if e.errno == errno.EPIPE:
                raise
            message = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        click.echo(f"edgetok: error: {message}", err=True)
        ctx.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="edgetok")
def cli() -> None:
    """Take a language model to the edge and run it there."""


def generation_options(f):
    options = [
        click.option("--max-new-tokens", "-n", type=click.IntRange(min=0), default=256, show_default=True),
        click.option("--temperature", "-t", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 = greedy"),
        click.option("--top-k", type=click.IntRange(min=0), default=0, help="0 = off"),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.0),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0),
        click.option("--seed", type=int, default=None, help="makes sampling reproducible"),
        click.option("--stop", multiple=True, help="stop before this string (repeatable)"),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores)"),
        click.option("--backend", type=click.Choice(["torch", "llamacpp", "onnxruntime"]), default=None,
                     help="default: onnxruntime for an ONNX export folder, torch otherwise; llamacpp runs a GGUF "
                          "through llama-cpp-python"),
        click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "dml", "coreml", "qnn", "openvino"]),
                     default="cpu", show_default=True, help="ONNX Runtime execution provider (--backend onnxruntime)"),
        click.option("--weights", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True,
                     help="torch backend weights: fp32 is the exact reference; int8 is weight-only, bf16 activations"),
        click.option("--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default=None,
                     help="llama.cpp's K/V cache type (--backend llamacpp)"),
        click.option("--kv-budget", default=None,
                     help="tokens each layer attends to: a count (2048) or a share of the context (25%%); 100%% is exact"),
        click.option("--kv-device-mb", type=float, default=None, help="fast-tier budget for float chunk copies"),
        click.option("--kv-host-mb", type=float, default=None, help="RAM budget for stored chunks (needs --kv-disk)"),
        click.option("--kv-disk", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="folder for chunks beyond the host budget"),
        click.option("--kv-bits", type=click.Choice(["auto", "32", "16", "8", "4", "2"]), default=None,
                     help="stored chunk precision; auto picks by importance (exact at 100%%)"),
        click.option("--kv-prefetch/--no-kv-prefetch", default=True, show_default=True,
                     help="read the next layer's chunks from host/disk while the current one computes"),
        click.option("--kv-disk-uncached", is_flag=True,
                     help="for benchmarks: every --kv-disk read goes to the device, past the page cache "
                          "(as for a cache larger than RAM)"),
        click.option("--kv-store", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="keep prompts' K/V in this folder: a later run with the same prompt prefix skips prefill"),
        click.option("--kv-store-rebuild", is_flag=True, help="recompute damaged or outdated --kv-store entries"),
        click.option("--prune-prompt", "prune_prompt", type=float, default=None, metavar="KEEP",
                     help="run the layers after --prune-after-layer on this fraction of the prompt (the tokens its end attends to most)"),
        click.option("--prune-after-layer", type=int, default=None, metavar="L",
                     help="the last layer that sees every prompt token (default 2)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _gen_config(kw: dict):
    from edgetok.runtimes.engine import GenerationConfig

    return GenerationConfig(
        max_new_tokens=kw["max_new_tokens"],
        temperature=kw["temperature"],
        top_k=kw["top_k"],
        top_p=kw["top_p"],
        min_p=kw["min_p"],
        repetition_penalty=kw["repetition_penalty"],
        seed=kw["seed"],
        stop=kw["stop"],
        prune_prompt=kw["prune_prompt"],
        prune_after_layer=kw["prune_after_layer"],
    )


def _kv_config(kw: dict):
    """A KVConfig when any tiered-cache option is given; None keeps the exact contiguous cache."""
    from edgetok.runtimes.kv import KVConfig

    names = ("kv_budget", "kv_device_mb", "kv_host_mb", "kv_disk", "kv_bits")
    if all(kw[n] is None for n in names) and not kw["kv_disk_uncached"]:
        return None
    return KVConfig(
        budget=kw["kv_budget"] or "100%",
        device_mb=kw["kv_device_mb"],
        host_mb=kw["kv_host_mb"],
        disk_dir=kw["kv_disk"],
        bits=kw["kv_bits"] or "auto",
        prefetch=kw["kv_prefetch"],
        disk_uncached=kw["kv_disk_uncached"],
    )


def _load(ref: str, kw: dict):
    import edgetok

    return edgetok.load(
        ref, backend=kw["backend"], provider=kw["provider"], weights=kw["weights"], threads=kw["threads"],
        kv_type=kw["kv_type"], kv=_kv_config(kw),
        kv_store=kw["kv_store"], kv_store_rebuild=kw["kv_store_rebuild"], progress=True,
    )


@contextmanager
def _prefill_bar(n_tokens: int):
    from tqdm import tqdm

    if n_tokens < LONG_PROMPT:
        yield None
        return
    with tqdm(total=n_tokens, desc="prefill", unit="tok", file=sys.stderr, leave=False) as bar:
        yield bar.update


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise EdgetokError("give either -p/--prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EdgetokError(f"{prompt_file} is not UTF-8 text") from None
    if prompt is None and sys.stdin.isatty():
        raise EdgetokError("no prompt: give -p TEXT, --prompt-file FILE, or pipe text on stdin")
    text = sys.stdin.read() if prompt is None else prompt
    if not text.strip():
        raise EdgetokError("the prompt is empty")
    return text


@cli.command()
@click.argument("model")
@click.option("--prompt", "-p", help="the prompt text")
@click.option("--prompt-file", "-f", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--chat/--no-chat", default=None, help="apply the chat template (default: when the model has one)")
@click.option("--system", help="a system message (chat mode)")
@generation_options
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of streaming text")
@click.option("--verbose", "-v", is_flag=True, help="print speed and memory to stderr")
def run(model, prompt, prompt_file, chat, system, as_json, verbose, **kw):
    """Generate text from MODEL ("smollm2", a Hugging Face folder, or a .gguf file)."""
    text = _read_prompt(prompt, prompt_file)
    cfg = _gen_config(kw)
    m = _load(model, kw)
    use_chat = m.has_chat_template if chat is None else chat
    if use_chat and not m.has_chat_template:
        raise EdgetokError(f"{model} has no chat template; drop --chat")
    if system is not None and not use_chat:
        raise EdgetokError("--system needs chat mode")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": text}]
    ids = m.encode(messages if use_chat else text, chat=use_chat)
    with _prefill_bar(len(ids)) as bar:
        stream = m.stream(messages if use_chat else text, cfg, chat=use_chat, progress=bar)
        for piece in stream:
            if not as_json:
                click.echo(piece, nl=False)
                sys.stdout.flush()
    result = stream.result
    if as_json:
        click.echo(json.dumps({
            "text": result.text,
            "tokens": result.tokens,
            "prompt_tokens": result.prompt_tokens,
            "finish_reason": result.finish_reason,
            "stats": result.stats.to_dict(),
        }))
    else:
        click.echo()
    if verbose:
        _print_stats(result.stats)


def _print_stats(s) -> None:
    click.echo(
        f"prompt {s.prompt_tokens} tok ({s.reused_prompt_tokens} reused), {s.prefill_tokens_per_s:.1f} tok/s; "
        f"generated {s.generated_tokens} tok, {s.decode_tokens_per_s:.1f} tok/s; "
        f"peak RSS {s.peak_rss_bytes / 2**20:.0f} MiB",
        err=True,
    )


@cli.command()
@click.argument("model")
@click.option("--system", help="a system message")
@generation_options
@click.option("--verbose", "-v", is_flag=True, help="print speed and memory after each reply")
def chat(model, system, verbose, **kw):
    """Chat with MODEL in the terminal. /reset starts over, /exit (or Ctrl-D) quits."""
    cfg = _gen_config(kw)
    m = _load(model, kw)
    if not m.has_chat_template:
        raise EdgetokError(f"{model} has no chat template; use `edgetok run --no-chat` instead")
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"edgetok chat · {model} · /reset to start over, /exit to quit", err=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(base)
            m.engine.reset()
            click.echo("(history cleared)", err=True)
            continue
        history.append({"role": "user", "content": line})
        stream = m.stream(history, cfg, chat=True)
        for piece in stream:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        history.append({"role": "assistant", "content": stream.result.text})
        if verbose:
            _print_stats(stream.result.stats)


# -- export: everything it needs is here, so the command can move as one piece ------------------------
def _int_or_none(ctx, param, value):
    """Choices given as text on the command line ("32") are numbers in the options."""
    return None if value is None else int(value)


@cli.command()
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["gguf", "hf", "onnx"]), required=True,
              help="gguf: llama.cpp's format; onnx: a folder for ONNX Runtime; hf: a Hugging Face folder (fp32)")
@click.option("--quant", type=click.Choice(export_choices.QUANTS), default="q8_0", show_default=True,
              help="GGUF tensor type of the weight matrices")
@click.option("--weights", type=click.Choice(export_choices.WEIGHTS), default="int4", show_default=True,
              help="ONNX weights: int4/int8 as MatMulNBits blocks (or DequantizeLinear with --qdq)")
@click.option("--block-size", type=click.Choice([str(b) for b in export_choices.BLOCK_SIZES]), default=None,
              callback=_int_or_none,
              help="ONNX int4/int8: weights per scale along the input (default 32; int8 --qdq: per channel)")
@click.option("--qdq", is_flag=True, help="ONNX: standard DequantizeLinear + MatMul only (for NPU execution providers)")
@click.option("--zero-points", type=click.Choice(export_choices.ZERO_POINTS), default="exact", show_default=True,
              help="ONNX int4: each block's exact minimum (a small MatMul per linear adds it), or integer zero points "
                   "(onnxruntime-genai's: fewer nodes, less exact)")
@click.option("--head-bits", type=click.Choice([str(b) for b in export_choices.HEAD_BITS]), default="8", show_default=True,
              callback=_int_or_none, help="ONNX int4: bits of the embedding and LM head (one tied matrix)")
@click.option("--opset", type=click.IntRange(min=export_choices.MIN_OPSET), default=export_choices.DEFAULT_OPSET,
              show_default=True, help="ONNX opset")
@click.option("--attention", type=click.Choice(export_choices.ATTENTION), default=None,
              help="ONNX: gqa = ONNX Runtime's fused kernels (default), standard = default-domain operators only (default with --qdq)")
@click.option("--prune-after-layer", type=click.IntRange(min=0), default=None,
              help="ONNX: the layer after which the graph can prune a prompt, for edgetok run --prune-prompt "
                   "(none by default: decoding is ~10% faster without)")
@click.option("--max-kl", type=click.FloatRange(min=0), default=None,
              help="fail (and write nothing) if the parity report's mean KL exceeds this")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="the file (gguf) or folder (onnx, hf) to write")
@click.option("--force", is_flag=True, help="overwrite an existing file")
@click.option("--keep-sensitive", is_flag=True, help="keep the tensors quantization hurts most at higher precision")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="text for the parity report (default: the built-in essays)")
@click.option("--eval-tokens", type=click.IntRange(min=export_choices.MIN_EVAL_TOKENS), default=None,
              help="parity report length (gguf 512, onnx 1024)")
@click.option("--verify/--no-verify", default=True, show_default=True, help="measure the parity report")
@click.option("--method", type=click.Choice(export_choices.METHODS), default="rtn", show_default=True,
              help="how weight codes are chosen: rtn rounds to nearest; gptq and rsq (rotated, importance-weighted "
                   "GPTQ) calibrate on text (gguf: --quant q4_0 or q8_0)")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="calibration text for gptq/rsq (default: the built-in essays)")
@click.option("--calib-tokens", type=click.IntRange(min=512), default=None,
              help="calibration tokens for gptq/rsq, in sequences of 512 (default 32768)")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def export(fmt, as_json, **kw):
    """Export MODEL to a compressed artifact, with a parity report against the fp32 reference."""
    if fmt != "onnx" and (kw["attention"] or kw["prune_after_layer"] is not None or kw["zero_points"] != "exact"
                          or kw["head_bits"] != 8):
        raise EdgetokError("--attention, --prune-after-layer, --zero-points and --head-bits apply to --format onnx")
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
    if manifest.parity_summary is not None:
        click.echo(f"parity vs fp32: {manifest.parity_summary}")
    click.echo(f"report: {o.output / ONNX_MANIFEST}")


def _print_gguf_export(o, manifest) -> None:
    from edgetok.models.manifest import gguf_report_path

    click.echo(f"wrote {o.output} ({manifest.size_bytes / 1e6:.1f} MB, {o.quant}, {o.method})")
    for name, kind in manifest.kept_at_higher_precision.items():
        kl = (manifest.sensitivity_kl or {}).get(name)
        click.echo(f"  kept at {kind}: {name}" + (f" (KL when quantized alone {kl:.4f})" if kl is not None else " (output projection)"))
    if manifest.parity_summary is not None:
        click.echo(f"parity vs fp32: {manifest.parity_summary}")
    click.echo(f"report: {gguf_report_path(o.output)}")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
def inspect(model, as_json):
    """Architecture, sizes, quantization, context and tokenizer of MODEL."""
    from edgetok.models.sources import load_source

    src = load_source(model, progress=True)
    c, t = src.config, src.tokenizer
    quant = src.info.get("tensor_types") or src.info.get("dtypes")
    report = {
        "model": model,
        "path": str(src.path),
        "format": src.format,
        "name": src.info.get("name"),
        "size_bytes": src.info.get("size_bytes"),
        "quantization": quant,
        "config": c.to_dict(),
        "parameters": c.n_params,
        "kv_bytes_per_token_fp32": c.kv_bytes_per_token(4),
        "tokenizer": {
            "kind": t.kind,
            "vocab_size": t.vocab_size,
            "bos": t.bos_token or None,
            "eos": [t.token_text(i) for i in t.eos_ids],
            "chat_template": bool(t.chat_template),
        },
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    rope = f"rope θ {c.rope_theta:g}" + (f", {c.rope_scaling['rope_type']} scaling" if c.rope_scaling else "")
    quant_text = ", ".join(f"{k} ×{v}" for k, v in quant.items()) if isinstance(quant, dict) else ", ".join(quant)
    rows = [
        ("model", f"{model} → {src.path}"),
        ("format", f"{src.format} ({quant_text}), {src.info.get('size_bytes', 0) / 1e6:.1f} MB"),
        ("architecture", f"{c.arch}, {c.num_layers} layers, hidden {c.hidden_size}, FFN {c.intermediate_size}"),
        ("attention", f"{c.num_heads} heads, {c.num_kv_heads} KV heads, head dim {c.head_dim}, {rope}"),
        ("parameters", f"{c.n_params / 1e6:.1f} M" + (" (tied embeddings)" if c.tie_word_embeddings else "")),
        ("context", f"{c.max_context} tokens; KV {c.kv_bytes_per_token(4) / 1024:.0f} KiB/token in fp32"),
        ("tokenizer", f"{t.kind}, {t.vocab_size} tokens, BOS {t.bos_token or '-'}, EOS {', '.join(report['tokenizer']['eos']) or '-'}"),
        ("chat template", "yes" if t.chat_template else "no"),
    ]
    for k, v in rows:
        click.echo(f"{k:<14}{v}")


@cli.command()
@click.argument("model")
@click.option("--contexts", default="1024,4096,8192", show_default=True,
              help="context lengths (tokens, or 8K); the prompt leaves room for the new tokens")
@click.option("--new-tokens", "-n", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--kv-budget", "kv_budgets", default="100%,25%", show_default=True,
              help="edgetok's tiered KV budgets to sweep (100%% is the exact run)")
@click.option("--peers", default="llamacpp,ortgenai,transformers", show_default=True,
              help="other runtimes on the same model, or none")
@click.option("--system", "extra_systems", multiple=True, metavar="NAME=OPTIONS",
              help="one more edgetok system: `edgetok run` options, e.g. 'int8=--weights int8 --kv-budget 25%'")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads of every system (default: all cores)")
@click.option("--repeat", type=click.IntRange(min=1), default=2, show_default=True, help="rounds; speeds are their median")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("edgetok-bench"), show_default=True,
              help="folder for results.json and the plots")
@click.option("--onnx", "onnx_weights", multiple=True, metavar="'W [EXPORT OPTIONS]'",
              help="also edgetok's ONNX export at weights W (fp32, fp16, int8, int4), with any more `edgetok export` "
                   "options (e.g. 'int4 --attention standard'), on its onnxruntime backend (exact and at each KV budget)")
def bench(model, contexts, new_tokens, kv_budgets, peers, extra_systems, threads, repeat, out, onnx_weights):
    """Speed, memory and quality of edgetok and peer runtimes on MODEL, each run in its own process."""
    import os
    import shlex

    from edgetok.bench import harness, plots, report

    threads = threads or os.cpu_count() or 1
    command = ["edgetok", "bench", model, "--contexts", contexts, "--new-tokens", str(new_tokens), "--kv-budget", kv_budgets,
               "--peers", peers, *(a for s in extra_systems for a in ("--system", s)),
               *(a for w in onnx_weights for a in ("--onnx", w)), "--threads", str(threads),
               "--repeat", str(repeat), "--out", str(out)]
    results = {"command": shlex.join(command), "machine": report.machine(), "versions": report.versions()}
    results |= harness.run_bench(
        model, harness.parse_contexts(contexts), new_tokens, [b.strip() for b in kv_budgets.split(",") if b.strip()],
        peers, threads, repeat, extra_systems, onnx=onnx_weights,
        on_update=lambda partial: report.write_results(results | partial, out),
    )
    report.write_results(results, out)
    pngs = plots.write_plots(results, out)
    click.echo(report.results_table(results))
    if ratios := report.ratios_table(results):
        click.echo("\nedgetok ÷ peer (median tokens/s)\n" + ratios)
    click.echo(f"\nwrote {out / 'results.json'}" + "".join(f", {p}" for p in pngs))
