"""Greedy decode speed of edgetok's torch path vs transformers (eager and sdpa), same weights.

    .venv/bin/python benchmarks/decode_vs_transformers.py --context 1024 --new-tokens 64

Both run the SmolLM2 weights edgetok loaded (dequantized fp32), on the same real-text prompt,
with the same thread count, interleaved (edgetok, eager, sdpa, edgetok, ...) over --repeat rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import essay_text  # noqa: E402

import edgetok  # noqa: E402
from edgetok.runtimes.engine import GenerationConfig  # noqa: E402


def hf_model(m: edgetok.Model, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = m.config
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_context, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(m.source.weights, strict=False)
    model.tie_weights()
    model.config._attn_implementation = attn
    return model


def hf_decode(model, prompt: list[int], new: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[0, -1].argmax()
        toks = [int(tok)]
        t = time.perf_counter()
        for _ in range(new - 1):
            out = model(tok.view(1, 1), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[0, -1].argmax()
            toks.append(int(tok))
        return (new - 1) / (time.perf_counter() - t), toks


def edgetok_decode(m: edgetok.Model, prompt: list[int], new: int) -> tuple[float, list[int]]:
    m.engine.reset()
    r = None
    for _ in m.engine.generate_ids(prompt, GenerationConfig(max_new_tokens=new, ignore_eos=True)):
        pass
    return r.stats.decode_tokens_per_s, r.tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = edgetok.load(args.model)
    prompt = m.tokenizer.encode(essay_text(args.context * 8))[: args.context]
    systems = {"edgetok": lambda p, n: edgetok_decode(m, p, n)}
    for attn in ("eager", "sdpa"):
        model = hf_model(m, attn)
        systems[f"transformers-{attn}"] = lambda p, n, model=model: hf_decode(model, p, n)
    speeds: dict[str, list[float]] = {k: [] for k in systems}
    tokens = {}
    for _ in range(args.repeat):
        for name, run in systems.items():
            tps, toks = run(prompt, args.new_tokens)
            speeds[name].append(tps)
            tokens[name] = toks
    report = {
        "context": args.context, "new_tokens": args.new_tokens, "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "decode_tokens_per_s": {k: round(statistics.median(v), 2) for k, v in speeds.items()},
        "same_tokens_as_edgetok": {k: tokens[k] == tokens["edgetok"] for k in tokens},
    }
    base = report["decode_tokens_per_s"]["edgetok"]
    report["edgetok_speedup"] = {k: round(base / v, 2) for k, v in report["decode_tokens_per_s"].items() if k != "edgetok"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
