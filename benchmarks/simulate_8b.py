"""Scaling past this machine, by simulation: Llama-3-8B's layer shape at 32K with the disk tier.

A random-weight model with Llama-3-8B's layer shape (hidden 4096, 32 query / 8 KV heads, head_dim 128,
FFN 14336, RoPE θ 500000), truncated to a few layers, int8 weights (torch backend: edgetok's reference
model with weight-only int8 linears), decodes with a tiered KV cache of 32K tokens spread over the
device tier (RAM here), host tier (RAM) and disk tier (read past the page cache, as for a cache
larger than RAM). Measured per layer and per token: the bytes each tier gave, the time the layer's
attention took through the cache (selection, tier reads, the mixed-bit attention op), the time the
model thread waited for the disk, and the rest of the layer (its linears); and, for comparison, the
same layers attending exactly to the same 32K tokens in RAM.

The prompt is not prefilled (32K tokens through 8B-shaped layers take longer here than a benchmark
hold may): each layer's 32K keys and values are drawn from the distribution of the layer's own
projections (their standard deviation measured on 256 real forwards of random hidden states) and
given to the cache as a saved prompt (KVState, what --kv-store loads), with the last 32 of those
queries as the prompt's observation window; then decode runs the model itself.

The projection: the planner's plans for a whole 8B (32 layers, vocabulary 128256) at 32K–128K on the
RTX 4090 and laptop RTX 4060 profiles, each tier's bytes from the planner's arithmetic and, beside
them, scaled by what this run measured (measured ÷ planned bytes per tier for the simulated cache).

    flock /tmp/edgetok-bench.lock python benchmarks/simulate_8b.py [--layers 2] [--context 32768] \
        [--out benchmarks/results/simulate_8b.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from edgetok.devices import catalog
from edgetok.devices.planner import AUTO_BITS_RATIO, GB, MB, plan
from edgetok.errors import EdgetokError
from edgetok.files import write_json_atomic
from edgetok.models.config import ModelConfig
from edgetok.models.llama import LlamaModel
from edgetok.runtimes.kv import ContiguousCache, KVConfig, KVState, budgeted_cache

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False}
SIM_VOCAB = 512  # the head is not a layer: a small one keeps memory for the cache
SAMPLE = 256  # tokens of real forwards that measure each layer's q, k, v spread
WINDOW = 32  # KVConfig.observation_window


def random_model(layers: int, seed: int = 0) -> tuple[ModelConfig, LlamaModel]:
    cfg = ModelConfig.from_hf(LLAMA3_8B | {"num_hidden_layers": layers, "vocab_size": SIM_VOCAB})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaModel(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    weights = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02) for k, s in shapes.items()}
    model = LlamaModel.from_state_dict(cfg, weights, int8=True)  # bf16 activations, int8 linears
    del weights
    return cfg, model


@torch.inference_mode()
def prompt_state(cfg: ModelConfig, model: LlamaModel, context: int, seed: int = 1) -> KVState:
    """Per layer (k, v) (Hkv, context, D) bf16 at the spread of the layer's own projections, and the
    last WINDOW queries."""
    g = torch.Generator().manual_seed(seed)
    rope = model.rope(torch.arange(context - SAMPLE, context), torch.bfloat16)
    layers, q_obs = [], []
    for i, block in enumerate(model.model.layers):
        x = torch.randn(1, SAMPLE, cfg.hidden_size, generator=g).to(torch.bfloat16)
        q, k, v = block.self_attn.project(block.input_layernorm(x), *rope.of(i))
        shape = (cfg.num_kv_heads, context, cfg.head_dim)
        keys = (torch.randn(shape, generator=g) * k.float().std()).to(torch.bfloat16)
        values = (torch.randn(shape, generator=g) * v.float().std()).to(torch.bfloat16)
        keys[:, -SAMPLE:], values[:, -SAMPLE:] = k[0], v[0]  # the sampled tokens are the prompt's last
        layers.append((keys, values))
        q_obs.append(q[0, :, -WINDOW:].contiguous())
    return KVState(layers, q_obs)


class LayerClock:
    """Wall time per layer (forward hooks on the blocks) and in the cache's attend (per layer)."""

    def __init__(self, model: LlamaModel, cache) -> None:
        n = len(model.model.layers)
        self.layer_s, self.attend_s = [0.0] * n, [0.0] * n
        self._start = [0.0] * n
        for i, block in enumerate(model.model.layers):
            block.register_forward_pre_hook(lambda m, a, i=i: self._begin(i))
            block.register_forward_hook(lambda m, a, out, i=i: self._end(i))
        attend = cache.attend

        def timed(layer, q, k, v):
            t = time.perf_counter()
            out = attend(layer, q, k, v)
            self.attend_s[layer] += time.perf_counter() - t
            return out

        cache.attend = timed  # (this instance only: the benchmark's stopwatch)

    def _begin(self, i: int) -> None:
        self._start[i] = time.perf_counter()

    def _end(self, i: int) -> None:
        self.layer_s[i] += time.perf_counter() - self._start[i]


@torch.inference_mode()
def decode(model: LlamaModel, cache, steps: int, warmup: int) -> dict:
    tokens = torch.randint(0, SIM_VOCAB, (warmup + steps,), generator=torch.Generator().manual_seed(2))
    for t in tokens[:warmup]:
        model(t.view(1, 1), cache)
    clock = LayerClock(model, cache)
    start = time.perf_counter()
    for t in tokens[warmup:]:
        model(t.view(1, 1), cache)
    wall = time.perf_counter() - start
    n = len(model.model.layers)
    return {"steps": steps, "step_ms": 1e3 * wall / steps,
            "layer_ms": 1e3 * sum(clock.layer_s) / steps / n, "attend_ms": 1e3 * sum(clock.attend_s) / steps / n}


def simulate(layers: int, context: int, budget: str, device_mb: float, host_mb: float, steps: int, disk: Path) -> dict:
    cfg, model = random_model(layers)
    state = prompt_state(cfg, model, context)
    kv = KVConfig(budget=budget, bits="auto", device_mb=device_mb, host_mb=host_mb, disk_dir=disk, disk_uncached=True)
    cache = budgeted_cache(kv, cfg.windows, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    cache.state = state
    cache.end_prefill()
    warmup = 4
    tiered = decode(model, cache, steps, warmup)
    stats = cache.stats()
    cache.close()
    exact_cache = ContiguousCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16, windows=cfg.windows)
    exact_cache.state = state
    del state
    exact = decode(model, exact_cache, max(steps // 2, 4), 2)
    per = steps + warmup  # the cache's counters count every decode step, the warm-up ones too
    read = {t: b / layers for t, b in stats["bytes_read_per_token"].items()}  # per layer per token
    resident = stats["resident_bytes"]
    stored = sum(resident.values())
    # The planner's arithmetic for this cache: of the bytes the budget attends (its share of every
    # chunk's stored form), each tier gives its share of what it holds.
    share = stats["budget_used"]
    planned = {t: share * resident[t] / layers for t in resident}
    return {
        "layers": layers, "context": context, "budget": budget, "device_mb": device_mb, "host_mb": host_mb,
        "per_layer_kv_bf16_bytes": cfg.kv_bytes_per_token(2) * context / layers,
        "stored_bytes_per_layer": stored / layers, "resident_bytes": resident,
        "budget_used": share, "chunk_sizes": stats["chunk_sizes"], "attention": stats.get("attention"),
        "read_per_layer_per_token": read, "planned_per_layer_per_token": planned,
        "disk_wait_ms_per_layer_per_token": 1e3 * stats["disk_wait_s"] / per / layers,
        "prefetch_read_ms_per_layer_per_token": 1e3 * stats["prefetch_read_s"] / per / layers,
        "process_read_bytes_per_layer_per_token": (stats["process_read_bytes"] or 0) / per / layers,
        "tiered": tiered, "exact": exact,
    }


def projection(sim: dict, contexts: list[int]) -> list[dict]:
    """The planner's plans for a whole 8B on the GPU profiles; beside each, the same plan with its
    host and disk bytes scaled by what the simulation measured against the planner's arithmetic
    (measured ÷ planned, per tier): what the host and disk no longer give, the device tier's cache
    of hot chunks gave (in float bytes there)."""
    cfg = ModelConfig.from_hf(LLAMA3_8B)
    ratio = {t: (sim["read_per_layer_per_token"][t] / p if p else 1.0)
             for t, p in sim["planned_per_layer_per_token"].items()}
    rows = []
    for profile in [p for p in catalog() if p.name in ("rtx4090", "rtx4060-laptop")]:
        for context in contexts:
            try:
                p = plan(cfg, profile, context)
            except EdgetokError as e:
                rows.append({"device": profile.name, "context": context, "refused": str(e)})
                continue
            reads = p.predicted_kv_read_bytes
            bw = {"device": profile.device_bandwidth_gb_s, "host": profile.host_to_device_gb_s, "disk": profile.disk_read_gb_s}
            fixed = 1 / p.predicted_decode_tokens_per_s - sum(reads[t] / (bw[t] * GB) for t in reads)
            scaled = {t: reads[t] * ratio[t] for t in ("host", "disk")}
            moved = (reads["host"] + reads["disk"] - scaled["host"] - scaled["disk"]) / AUTO_BITS_RATIO
            scaled["device"] = max(reads["device"] + moved, 0.0)
            rows.append({
                "device": profile.name, "context": context, "kv_budget": p.kv_budget,
                "tiers_mb": {"device": p.kv_device_mb, "host": p.kv_host_mb, "disk": p.kv_disk},
                "planned_kv_read_mb": {t: round(b / MB, 1) for t, b in reads.items()},
                "planned_tokens_per_s": p.predicted_decode_tokens_per_s,
                "scaled_kv_read_mb": {t: round(b / MB, 1) for t, b in scaled.items()},
                "scaled_tokens_per_s": round(1 / (fixed + sum(scaled[t] / (bw[t] * GB) for t in scaled)), 2),
                "peak_device_gib": round(p.predicted_peak_device_bytes / 2**30, 1),
                "peak_host_gib": round(p.predicted_peak_host_bytes / 2**30, 1),
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--device-mb", type=float, default=32.0, help="the device tier (all layers)")
    ap.add_argument("--host-mb", type=float, default=96.0, help="the host tier (all layers); the rest goes to disk")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--kv-dir", type=Path, default=None, help="the disk tier's folder (default: the temp dir)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/simulate_8b.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgetok-sim-", dir=args.kv_dir) as disk:
        sim = simulate(args.layers, args.context, args.budget, args.device_mb, args.host_mb, args.steps, Path(disk))
    rows = projection(sim, [32768, 65536, 131072])
    ratio = {t: (sim["read_per_layer_per_token"][t] / p if p else None) for t, p in sim["planned_per_layer_per_token"].items()}
    write_json_atomic(args.out, {"simulation": sim, "measured_over_planned": ratio, "projection": rows,
                                 "stored_bits_ratio_assumed": AUTO_BITS_RATIO,
                                 "machine": "2-core Xeon shared with other jobs (run under the benchmark lock)"})
    print(json.dumps(sim, indent=1))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
