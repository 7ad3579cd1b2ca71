"""Peer runtimes timed by `edgetok bench`, each in its own process.

    python -m edgetok.bench.peers transformers HF_DIR --prompt-ids IDS.json -n N --threads T
                                  [--follow IDS.json] [--logits-out FILE.npy]
    python -m edgetok.bench.peers ortgenai MODEL_DIR ...   (onnxruntime-genai's model builder output)
    .venv-optimum/bin/python -m edgetok.bench.peers optimum MODEL_DIR ...   (optimum's ONNX export, run in
                                                                          optimum-onnx's own environment)

Each prints the JSON fields of `edgetok run --json`, timed as edgetok's engine times itself:
prefill is one call with the whole prompt (as each library's own generate does), the first token
comes from its logits, then one call per token; decode tokens/s counts the calls after prefill.
(llama.cpp needs no runner here: it is `edgetok run --backend llamacpp`, see forced.py.)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

from edgetok.bench.record import read_ids, result_json, write_logits
from edgetok.errors import EdgetokError
from edgetok.runtimes.engine import Stats, peak_rss_bytes

# step(token or None) → logits of the next position; None runs the whole prompt (prefill).
Stepper = Callable[[list[int]], np.ndarray]


def timed_decode(step: Stepper, prompt: list[int], n: int, follow: list[int] | None) -> tuple[list[int], list, Stats]:
    """Greedy (or `follow`ed) decoding of n tokens with the engine's timings."""
    stats = Stats(prompt_tokens=len(prompt), generated_tokens=n)
    t0 = time.perf_counter()
    logits = step(prompt)
    stats.prefill_s = time.perf_counter() - t0
    rows, tokens = [], []
    t1 = time.perf_counter()
    for i in range(n):
        rows.append(logits)
        tokens.append(int(np.argmax(logits)))
        if i == 0:
            stats.time_to_first_token_s = time.perf_counter() - t0
        if i < n - 1:
            logits = step([follow[i] if follow is not None else tokens[-1]])
            stats.decode_steps += 1
    stats.decode_s = time.perf_counter() - t1
    stats.peak_rss_bytes = peak_rss_bytes()
    return tokens, rows, stats


def transformers_stepper(folder: Path, threads: int):
    """fp32 weights, transformers' default attention and default (dynamic) cache."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    state = {"cache": None}

    @torch.inference_mode()
    def step(tokens: list[int]) -> np.ndarray:
        out = model(torch.tensor([tokens]), cache=state["cache"], use_cache=True, logits_to_keep=1)
        state["cache"] = out.cache
        return out.logits[0, -1].numpy()

    def kv_stats() -> dict:
        cache = state["cache"]
        resident = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        return {"kind": "transformers DynamicCache (fp32)", "resident_bytes": {"device": resident}}

    return step, kv_stats


def ortgenai_stepper(folder: Path, threads: int, max_length: int):
    """The model builder's ONNX model run by onnxruntime-genai's generator on the CPU."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)

    def step(tokens: list[int]) -> np.ndarray:
        generator.append_tokens(tokens)  # runs the model on them
        return np.asarray(generator.get_logits())[0, -1]

    def kv_stats() -> dict:
        return {"kind": "onnxruntime-genai", "resident_bytes": {"device": ortgenai_kv_bytes(folder, max_length)}}

    return step, kv_stats


def optimum_stepper(folder: Path, threads: int):
    """optimum's ORTModelForCausalLM on its own export, on the CPU (its default there: no IO binding),
    fed as its generate feeds it: an attention_mask over every token, the new tokens' positions, and
    the past it returned."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(threads)  # (torch only holds the inputs and the past between steps)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    model = ORTModelForCausalLM.from_pretrained(folder, session_options=opts, provider="CPUExecutionProvider")
    state = {"past": None, "length": 0}

    def step(tokens: list[int]) -> np.ndarray:
        start, end = state["length"], state["length"] + len(tokens)
        out = model(input_ids=torch.tensor([tokens]), attention_mask=torch.ones((1, end), dtype=torch.long),
                    position_ids=torch.arange(start, end)[None], past_key_values=state["past"], use_cache=True)
        state["past"], state["length"] = out.past_key_values, end
        return out.logits[0, -1].numpy()

    def kv_stats() -> dict:
        resident = sum(t.nbytes for layer in state["past"] for t in layer)
        return {"kind": "optimum past_key_values (fp32)", "resident_bytes": {"device": resident}}

    return step, kv_stats


def ortgenai_kv_bytes(folder: Path, max_length: int) -> int:
    """The generator's K/V buffers: with past_present_share_buffer they hold max_length tokens."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    genai = json.loads((folder / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    graph = onnx.load(str(folder / dec["filename"]), load_external_data=False).graph
    key = dec["inputs"]["past_key_names"] % 0
    elem = next(i.type.tensor_type.elem_type for i in graph.input if i.name == key)
    length = max_length if genai["search"].get("past_present_share_buffer") else max_length - 1
    per_token = 2 * dec["num_hidden_layers"] * dec["num_key_value_heads"] * dec["head_size"]
    return per_token * length * np.dtype(tensor_dtype_to_np_dtype(elem)).itemsize


@click.command()
@click.argument("peer", type=click.Choice(["transformers", "ortgenai", "optimum"]))
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt-ids", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), required=True)
@click.option("--threads", type=click.IntRange(min=1), required=True)
@click.option("--follow", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--logits-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(peer, folder, prompt_ids, max_new_tokens, threads, follow, logits_out) -> None:
    try:
        prompt = read_ids(prompt_ids)
        follow_ids = read_ids(follow) if follow else None
    except EdgetokError as e:
        click.echo(f"edgetok: error: {e}", err=True)
        sys.exit(1)
    if peer == "transformers":
        step, kv_stats = transformers_stepper(folder, threads)
    elif peer == "optimum":
        step, kv_stats = optimum_stepper(folder, threads)
    else:
        step, kv_stats = ortgenai_stepper(folder, threads, len(prompt) + max_new_tokens)
    tokens, rows, stats = timed_decode(step, prompt, max_new_tokens, follow_ids)
    stats.kv = kv_stats()
    if logits_out is not None:
        write_logits(logits_out, rows)
    click.echo(result_json(tokens, len(prompt), stats))


if __name__ == "__main__":
    main()
