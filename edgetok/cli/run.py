"""`edgetok run`: one prompt in, text (or one JSON object) out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgetok.cli.console import prefill_bar, print_choice, print_stats, read_prompt
from edgetok.cli.options import load_model, run_configs, run_options
from edgetok.errors import EdgetokError


@click.command("run")
@click.argument("model")
@click.option("--prompt", "-p", help="the prompt text")
@click.option("--prompt-file", "-f", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--chat/--no-chat", default=None, help="apply the chat template (default: when the model has one)")
@click.option("--system", help="a system message (chat mode)")
@run_options
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of streaming text")
@click.option("--verbose", "-v", is_flag=True, help="print speed and memory to stderr")
def command(model, prompt, prompt_file, chat, system, as_json, verbose, **kw):
    """Generate text from MODEL: "smollm2", a Hugging Face folder, a .gguf file or an ONNX export folder."""
    if system is not None and chat is False:  # (refused before a model loads)
        raise EdgetokError("--system needs chat mode")
    text = read_prompt(prompt, prompt_file)
    configs = run_configs(kw)
    cfg, m = configs.generation, load_model(model, configs)
    use_chat = m.has_chat_template if chat is None else chat
    if use_chat and not m.has_chat_template:
        raise EdgetokError(f"{model} has no chat template; drop --chat")
    if system is not None and not use_chat:
        raise EdgetokError("--system needs chat mode")
    if verbose:  # (after the refusals: a refused run prints its one sentence alone)
        print_choice(m.choice)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": text}]
    ids = m.encode(messages if use_chat else text, chat=use_chat)
    with prefill_bar(len(ids)) as bar:
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
            "engine": m.choice.to_dict(),
        }))
    else:
        click.echo()
    if verbose:
        print_stats(result.stats)
