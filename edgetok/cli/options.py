"""The options `run`, `chat` and the bench's systems share, and the configs they become.

Flag names are the configs' field names: a GenerationConfig field `top_k` is `--top-k`, an
`edgetok.load` parameter `kv_store` is `--kv-store`, and a KVConfig field `budget` is
`--kv-budget` (KV fields carry the `kv-` prefix; `--kv-disk` is kept as a short name of
`--kv-disk-dir`). `run_configs` is the one place that turns
parsed options into configs; the bench's subprocess (`edgetok.bench.forced`) uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from edgetok.errors import EdgetokError
from edgetok.runtimes.backends.base import PRUNE
from edgetok.runtimes.backends.providers import PROVIDERS
from edgetok.runtimes.choice import AUTO_PLAN
from edgetok.runtimes.engine import GenerationConfig
from edgetok.runtimes.kv import KVConfig
from edgetok.runtimes.speculation import SPECULATE_CHOICES, SpeculationParams

GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                     "stop", "prune_prompt", "prune_after_layer", "speculate", "draft_max", "lookup_ngram_min",
                     "lookup_ngram_max", "draft_width")
LOAD_FIELDS = ("backend", "provider", "weights", "threads", "kv_type", "kv_store", "kv_store_rebuild", "plan")
# KVConfig fields with a flag; given any of them (but prefetch, which has a default), the tiered cache is used
KV_FIELDS = ("budget", "coverage", "device_mb", "host_mb", "disk_dir", "bits", "prefetch", "prefetch_steps", "disk_uncached",
             "summaries", "selection", "scoring", "op_provider")
# KV fields that only tune a tiered cache: alone they do not ask for one
KV_TUNING = ("prefetch", "prefetch_steps", "summaries", "selection", "scoring")


def run_options(f):
    """Every option of a run: generation, engine (load) and KV cache."""
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
                     help="default: onnxruntime, on an ONNX export or the model's default export (int4, float "
                          "activations; built once); torch is the exact fp32 reference; llamacpp runs a GGUF through "
                          "llama-cpp-python"),
        click.option("--provider", type=click.Choice(["auto", *PROVIDERS]), default=None,
                     help="ONNX Runtime execution provider (--backend onnxruntime; default: the plan's, else cpu)"),
        click.option("--plan", default=AUTO_PLAN, show_default=True, metavar="auto|FILE|none",
                     help="when edgetok chooses the engine: auto plans for this machine (`edgetok plan MODEL`), FILE "
                          "applies a plan saved by `edgetok plan --json`, none applies no plan; it sets the provider, "
                          "threads and the long prompts' KV cache (budget, bits, tiers) the options here leave unset"),
        click.option("--weights", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True,
                     help="torch backend weights: fp32 is the exact reference; int8 is weight-only, bf16 activations"),
        click.option("--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default=None,
                     help="llama.cpp's K/V cache type (--backend llamacpp)"),
        click.option("--kv-budget", default=None,
                     help="tokens each layer attends to: a count (2048) or a share of the context (25%); 100% is exact; "
                          "auto: per layer and step, as many as --kv-coverage needs"),
        click.option("--kv-coverage", type=float, default=None,
                     help="--kv-budget auto: the share of each head's attention the chunks read should hold (default 0.95)"),
        click.option("--kv-summaries", type=click.Choice(["on", "off"]), default=None,
                     help="under a budget, add each chunk attention does not read as one pseudo-token (its mean key "
                          "and value); default off"),
        click.option("--kv-selection", type=click.Choice(["layer", "head"]), default=None,
                     help="under a budget, one set of chunks per layer, or each KV head its own (chunks in RAM, "
                          "torch backend)"),
        click.option("--kv-scoring", type=click.Choice(["tokens", "bounds"]), default=None,
                     help="under a budget, rank chunks by their tokens' scores on the query's largest channels (every "
                          "key in RAM) or by each chunk's bound from its keys' min / max; default tokens in RAM, bounds "
                          "over tiers (--kv-bits, --kv-device-mb, --kv-host-mb)"),
        click.option("--kv-device-mb", type=float, default=None, help="fast-tier budget for float chunk copies"),
        click.option("--kv-host-mb", type=float, default=None, help="RAM budget for stored chunks (needs --kv-disk)"),
        click.option("--kv-disk-dir", "--kv-disk", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="folder for chunks beyond the host budget"),
        click.option("--kv-bits", type=click.Choice(["auto", "32", "16", "8", "4", "2"]), default=None,
                     help="stored chunk precision; auto picks by importance (exact at 100%)"),
        click.option("--kv-prefetch", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="read likely chunks from disk in the background: the next layer's while one computes "
                          "(torch), the next step's while the graph runs (onnxruntime); auto does while disk reads "
                          "wait for the device, not while the file sits in the page cache"),
        click.option("--kv-op-provider", default=None, metavar="PROVIDER",
                     help="run the mixed-bit attention op as its ONNX form of standard operators on this onnxruntime "
                          "execution provider (an NPU's), not the native kernel; chunks in tiers only"),
        click.option("--kv-prefetch-steps", type=click.IntRange(min=1), default=None,
                     help="prefetch the on-disk chunks a layer selected in its last N steps (default 3)"),
        click.option("--kv-disk-uncached", is_flag=True,
                     help="for benchmarks: every --kv-disk read goes to the device, past the page cache "
                          "(as for a cache larger than RAM)"),
        click.option("--kv-store", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="keep prompts' K/V in this folder: a later run with the same prompt prefix skips prefill"),
        click.option("--kv-store-rebuild", is_flag=True, help="recompute damaged or outdated --kv-store entries"),
        click.option("--prune-prompt", type=float, default=None, metavar="KEEP",
                     help="run the layers after --prune-after-layer on this fraction of the prompt (the tokens its end attends to most)"),
        click.option("--prune-after-layer", type=int, default=None, metavar="L",
                     help="the last layer that sees every prompt token (default 2)"),
        click.option("--speculate", type=click.Choice(SPECULATE_CHOICES), default="none", show_default=True,
                     help="draft tokens and verify them in one forward: lookup copies n-grams of the prompt and "
                          "output (quotes, summaries, code edits), recycle the model's own past candidates; "
                          "greedy output is unchanged"),
        click.option("--draft-max", type=click.IntRange(min=1), default=SpeculationParams.draft_max, show_default=True,
                     metavar="K", help="tokens drafted per step at most (fewer while drafts miss)"),
        click.option("--draft-width", type=click.IntRange(min=1), default=SpeculationParams.draft_width, show_default=True,
                     metavar="W", help="children per drafted token at most: 1 drafts a chain; more draft a tree "
                                       "(recycle: each token's top-W candidates, K·W nodes) verified with tree attention "
                                       "where the backend and KV cache allow it (torch or the default engine, the exact cache), "
                                       "a chain elsewhere"),
        click.option("--lookup-ngram-min", type=click.IntRange(min=1), default=SpeculationParams.lookup_ngram_min,
                     show_default=True, help="--speculate lookup: the shortest n-gram it matches"),
        click.option("--lookup-ngram-max", type=click.IntRange(min=1), default=SpeculationParams.lookup_ngram_max,
                     show_default=True, help="--speculate lookup: the longest n-gram it tries first"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@dataclass(frozen=True)
class RunConfigs:
    generation: GenerationConfig
    load: dict[str, Any]  # edgetok.load's keyword arguments, kv (a KVConfig or None) among them


def run_configs(options: dict[str, Any]) -> RunConfigs:
    """Parsed `run_options` (by field name) → the configs they stand for, checked."""
    generation = GenerationConfig(**{name: options[name] for name in GENERATION_FIELDS})
    load = {name: options[name] for name in LOAD_FIELDS}
    if load["plan"] == "none":
        load["plan"] = None
    if generation.prune_prompt is not None:
        load["needs"] = frozenset({PRUNE})  # an engine chosen for this run must be able to prune
    return RunConfigs(generation, load | {"kv": kv_config(options)})


def kv_config(options: dict[str, Any]) -> KVConfig | None:
    """A KVConfig when any tiered-cache option is given; None keeps the exact contiguous cache."""
    given = {name: options[f"kv_{name}"] for name in KV_FIELDS}
    if given["prefetch_steps"] is not None and given["disk_dir"] is None:
        # (alone it would switch to the tiered cache for nothing: prefetch reads the disk tier)
        raise EdgetokError("--kv-prefetch-steps applies to the KV disk tier: give --kv-disk DIR too")
    if all(given[name] in (None, False) for name in KV_FIELDS if name not in KV_TUNING):
        return None
    return KVConfig(**{name: value for name, value in given.items() if value is not None})


def load_model(ref: str, configs: RunConfigs):
    import gc

    import edgetok

    model = edgetok.load(ref, **configs.load, progress=True)
    # The command owns its process and what loading made lives as long as it: frozen, the cyclic
    # collector stops walking those objects (torch's, ONNX Runtime's) again and again while tokens
    # are decoded (4 % of a decode step at 8K in one perf profile). (A library call leaves the host's GC alone.)
    gc.freeze()
    return model
