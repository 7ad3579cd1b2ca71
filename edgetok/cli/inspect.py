"""`edgetok inspect`: what a model is, without running it."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
def command(model, as_json):
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
