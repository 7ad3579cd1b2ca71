"""One edgetok system in its own process, loaded exactly as `edgetok run` loads it.

    python -m edgetok.bench.forced MODEL --prompt-ids IDS.json -n N [--follow IDS.json]
                                   [--logits-out FILE.npy] [any `edgetok run` model option]

It takes the same options as `edgetok run` (the same decorator), so an edgetok system in the bench
is just a list of `edgetok run` options (`--kv-budget 25%`, `--weights int8`, `--backend ...`).
Generation goes through the engine; a thin wrapper around the backend feeds the `--follow` tokens
while decoding and keeps each position's logits. EOS does not end the run: every system decodes N.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click
import numpy as np

from edgetok.bench.record import read_ids, result_json, write_logits
from edgetok.cli.options import load_model, run_configs, run_options
from edgetok.errors import EdgetokError
from edgetok.runtimes.backends.base import BATCH, TREE, Backend


class TeacherForcing:
    """A backend that, once decoding starts, runs the `follow` tokens instead of the engine's
    choices and keeps the logits of every generated position (the prefill's last one first).

    The engine still samples from each row, so its output tokens are this system's argmax given
    the followed prefix: what greedy agreement compares. Every other call goes to the wrapped
    backend unchanged."""

    def __init__(self, backend: Backend, follow: list[int] | None) -> None:
        self.inner = backend
        self.name, self.config = backend.name, backend.config
        self.capabilities = backend.capabilities - {BATCH, TREE}  # one sequence, its steps recorded one by one
        self.prune_after_layer = backend.prune_after_layer
        self.weights_fidelity = backend.weights_fidelity
        self.min_draft, self.node_cost = backend.min_draft, backend.node_cost
        self.follow = follow
        self.rows: list[np.ndarray] = []  # (V,) float32 each
        self._decoding = False
        self._last: np.ndarray | None = None

    def forward(self, tokens: list[int], cache, last: int = 1) -> np.ndarray:
        if self._decoding and self.follow is not None:
            tokens = [self.follow[len(self.rows) - 1]]
        logits = self.inner.forward(tokens, cache, last)
        if self._decoding:
            self.rows.append(logits[-1].copy())
        else:
            self._last = logits[-1]
        return logits

    def forward_batch(self, tokens: list[int], caches: list) -> np.ndarray:
        raise EdgetokError("teacher forcing records one sequence; it runs no batch")

    def prefill_pruned(self, tokens: list[int], cache, plan, chunk: int, progress=None):
        pruned = self.inner.prefill_pruned(tokens, cache, plan, chunk, progress)
        self._last = pruned.logits
        return pruned

    def end_prefill(self, cache) -> None:
        self.inner.end_prefill(cache)
        self._decoding = True
        self.rows = [self._last.copy()]

    def new_cache(self, kv=None):
        return self.inner.new_cache(kv)

    def truncate(self, cache, n: int) -> int:
        return self.inner.truncate(cache, n)

    def cache_stats(self, cache) -> dict:
        return self.inner.cache_stats(cache)

    def save_prefix(self, cache):
        return self.inner.save_prefix(cache)

    def load_prefix(self, cache, state) -> None:
        self.inner.load_prefix(cache, state)


def generate(model, prompt: list[int], cfg, follow: list[int] | None):
    """The engine's Result and the logits rows, with `follow` fed while decoding."""
    if follow is not None and cfg.speculate != "none":
        raise EdgetokError("--follow feeds the tokens one at a time; a system with --speculate cannot follow them")
    if follow is not None and len(follow) < cfg.max_new_tokens - 1:
        raise EdgetokError(f"--follow has {len(follow)} tokens; decoding {cfg.max_new_tokens} needs {cfg.max_new_tokens - 1}")
    forced = TeacherForcing(model.engine.backend, follow)
    model.engine.backend = forced
    *_, result = model.engine.generate_ids(prompt, cfg)  # text pieces, then the Result
    return result, forced.rows


@click.command()
@click.argument("model")
@click.option("--prompt-ids", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--follow", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--logits-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@run_options
def main(model, prompt_ids, follow, logits_out, **kw) -> None:
    try:
        prompt = read_ids(prompt_ids)
        configs = run_configs(kw)
        cfg = dataclasses.replace(configs.generation, ignore_eos=True)
        m = load_model(model, configs)
        result, rows = generate(m, prompt, cfg, read_ids(follow) if follow else None)
    except EdgetokError as e:
        click.echo(f"edgetok: error: {e}", err=True)
        sys.exit(1)
    if logits_out is not None:
        write_logits(logits_out, rows)
    click.echo(result_json(result.tokens, result.prompt_tokens, result.stats, result.text))


if __name__ == "__main__":
    main()
