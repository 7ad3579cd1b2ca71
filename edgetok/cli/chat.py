"""`edgetok chat`: a conversation in the terminal."""

from __future__ import annotations

import sys

import click

from edgetok.cli.console import print_choice, print_stats
from edgetok.cli.options import load_model, run_configs, run_options
from edgetok.errors import EdgetokError


@click.command("chat")
@click.argument("model")
@click.option("--system", help="a system message")
@run_options
@click.option("--verbose", "-v", is_flag=True, help="print speed and memory after each reply")
def command(model, system, verbose, **kw):
    """Chat with MODEL in the terminal. /reset starts over, /exit (or Ctrl-D) quits; Ctrl-C stops a reply."""
    configs = run_configs(kw)
    cfg, m = configs.generation, load_model(model, configs)
    if not m.has_chat_template:
        raise EdgetokError(f"{model} has no chat template; use `edgetok run --no-chat` instead")
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"edgetok chat · {model} · /reset to start over, /exit to quit", err=True)
    if verbose:
        print_choice(m.choice)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except UnicodeDecodeError:
            raise EdgetokError("stdin is not UTF-8 text") from None
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(base)
            m.reset()
            click.echo("(history cleared)", err=True)
            continue
        history.append({"role": "user", "content": line})
        shown = []
        try:
            with m.stream(history, cfg, chat=True) as stream:
                for piece in stream:
                    shown.append(piece)
                    click.echo(piece, nl=False)
                    sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C ends the reply, not the conversation
            click.echo()
            click.echo("(reply stopped)", err=True)
            history.append({"role": "assistant", "content": "".join(shown)})  # what the user saw
            continue
        click.echo()
        history.append({"role": "assistant", "content": stream.result.text})
        if verbose:
            print_stats(stream.result.stats)
