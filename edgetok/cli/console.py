"""What the run and chat commands read from and write to the terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import click

from edgetok.errors import EdgetokError

LONG_PROMPT = 1024  # tokens: longer prompts get a prefill progress bar


def utf8(data: bytes, where: str) -> str:
    """Bytes → text, or one sentence saying where the first byte that is not UTF-8 is."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgetokError(f"{where} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """-p TEXT, --prompt-file FILE or stdin, exactly one of them, as UTF-8 text."""
    if prompt is not None and prompt_file is not None:
        raise EdgetokError("give either -p/--prompt or --prompt-file, not both")
    if prompt_file is not None:
        text = utf8(prompt_file.read_bytes(), str(prompt_file))
    elif prompt is not None:
        # Python hands over command-line bytes that are not UTF-8 as lone surrogates: undo that to say where
        try:
            raw = prompt.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise EdgetokError("the -p prompt is not UTF-8 text") from None
        text = utf8(raw, "the -p prompt")
    elif sys.stdin.isatty():
        raise EdgetokError("no prompt: give -p TEXT, --prompt-file FILE, or pipe text on stdin")
    else:
        stdin = getattr(sys.stdin, "buffer", None)
        text = utf8(stdin.read(), "stdin") if stdin is not None else sys.stdin.read()
    if not text.strip():
        raise EdgetokError("the prompt is empty")
    return text


@contextmanager
def prefill_bar(n_tokens: int):
    """A progress callback for prompts long enough to wait for, else None."""
    from tqdm import tqdm

    if n_tokens < LONG_PROMPT:
        yield None
        return
    with tqdm(total=n_tokens, desc="prefill", unit="tok", file=sys.stderr, leave=False) as bar:
        yield bar.update


def print_choice(choice) -> None:
    """Which engine runs and why (--verbose), on stderr."""
    for line in choice.lines():
        click.echo(line, err=True)


def print_stats(s) -> None:
    """One line of speed and memory (--verbose), on stderr."""
    drafts = f"drafts {s.accepted}/{s.drafted} accepted ({s.mean_accepted_length:.2f} per step); " if s.drafted else ""
    click.echo(
        f"prompt {s.prompt_tokens} tok ({s.reused_prompt_tokens} reused), {s.prefill_tokens_per_s:.1f} tok/s; "
        f"generated {s.generated_tokens} tok, {s.decode_tokens_per_s:.1f} tok/s; {drafts}"
        f"peak RSS {s.peak_rss_bytes / 2**20:.0f} MiB",
        err=True,
    )
