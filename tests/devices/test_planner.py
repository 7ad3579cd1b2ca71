"""The planner: exact where the cache fits and the context is short, tiers where memory runs out,
one sentence where nothing fits, and arithmetic that adds up."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from conftest import run_cli

from edgetok.devices import DeviceProfile, catalog
from edgetok.devices.planner import EXACT_UP_TO, RUNTIME_BASE_BYTES, plan, weight_bytes
from edgetok.errors import EdgetokError
from edgetok.models.config import ModelConfig

# SmolLM2-135M's shape, from its config: the arithmetic below checks against BENCHMARKS.md's numbers.
SMOLLM2 = ModelConfig.from_hf({
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "tie_word_embeddings": True,
})


def profile(**change) -> DeviceProfile:
    base = next(p for p in catalog() if p.name == "raspberry-pi-5-8gb").to_dict()
    return DeviceProfile(**(base | {"name": "test"} | change))


def test_the_int4_weights_are_what_the_export_writes():
    assert weight_bytes(SMOLLM2) / 1e6 == pytest.approx(100.5, rel=0.1)  # the int4 export: 100.5 MB of weights


def test_short_contexts_stay_exact_long_ones_get_the_budget():
    short = plan(SMOLLM2, profile(), 1024, threads=2)
    assert (short.kv_budget, short.kv_device_mb, short.engine, short.weights) == ("100%", None, "onnxruntime", "int4")
    assert short.run_options() == ["--provider", "cpu", "--threads", "2"]
    assert plan(SMOLLM2, profile(), 8192, threads=2).kv_budget == "100%"  # exact up to EXACT_UP_TO
    long = plan(replace(SMOLLM2, max_context=32768), profile(), 16384, threads=2)
    assert long.kv_budget == "25%" and long.kv_device_mb is None and "--kv-budget" in long.run_options()
    assert 16384 > EXACT_UP_TO >= 8192
    assert long.predicted_peak_host_bytes > short.predicted_peak_host_bytes > RUNTIME_BASE_BYTES
    assert long.arithmetic and all(isinstance(line, str) for line in long.arithmetic)


def test_less_memory_than_the_cache_needs_makes_tiers_that_fit():
    small = profile(device_memory_gb=1.0, host_memory_gb=1.5)
    p = plan(SMOLLM2, small, 8192, threads=2)
    assert p.kv_device_mb is not None and p.kv_budget == "25%" and p.kv_bits == "auto"
    assert p.predicted_peak_host_bytes <= 0.85 * 1.5e9  # inside the profile, with its margin
    options = p.run_options()
    assert options[options.index("--kv-host-mb") + 1] == f"{p.kv_host_mb:g}" and "--kv-disk" in options


def test_a_faster_device_predicts_faster_decoding():
    slow, fast = plan(SMOLLM2, profile(), 4096, 1), plan(SMOLLM2, profile(device_bandwidth_gb_s=170), 4096, 1)
    assert fast.predicted_decode_tokens_per_s > slow.predicted_decode_tokens_per_s > 0
    assert math.isfinite(plan(SMOLLM2, next(p for p in catalog() if p.name == "rtx4090"), 8192).predicted_decode_tokens_per_s)


def test_nothing_fits_and_impossible_contexts_are_one_sentence():
    with pytest.raises(EdgetokError, match="nothing fits on test"):
        plan(SMOLLM2, profile(device_memory_gb=0.25, host_memory_gb=0.5), 8192)
    with pytest.raises(EdgetokError, match="--context 9000 is impossible"):
        plan(SMOLLM2, profile(), 9000)


def test_plan_command(tiny_folder, tmp_path):
    r = run_cli("plan", tiny_folder, "--device", "rtx4090", "--context", "64", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["execution_provider"] == "cuda" and out["run_options"][:2] == ["--provider", "cuda"]
    r = run_cli("plan", tiny_folder, "--device", "rtx4090")
    assert r.exit_code == 0 and "predicted" in r.stdout
    assert "builds" in r.stdout and "run with: edgetok run " in r.stdout and "--provider cuda" in r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(profile().to_dict() | {"device_memory_gb": -1}))
    r = run_cli("plan", tiny_folder, "--device", bad)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "absurd" in r.stderr


LLAMA3_8B = ModelConfig.from_hf({
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072, "tie_word_embeddings": False,
})


def test_tier_reads_spread_the_attended_bytes_as_the_cache_lies():
    from edgetok.devices.planner import AUTO_BITS_RATIO, tier_reads

    assert tier_reads(100.0, 400.0, 400.0, 0.0, 0.0) == {"device": 100.0, "host": 0.0, "disk": 0.0}
    reads = tier_reads(100.0, 400.0, 100.0, 60.0, 30.0)  # a quarter on the device, the rest stored 2:1
    assert reads["device"] == pytest.approx(25.0)
    assert reads["host"] + reads["disk"] == pytest.approx(75.0 * AUTO_BITS_RATIO)  # stored forms are read
    assert reads["host"] == pytest.approx(2 * reads["disk"])


def test_an_8b_model_at_long_contexts_plans_tiers_on_the_gpus_and_reads_add_up():
    for name in ("rtx4090", "rtx4060-laptop"):
        gpu = next(p for p in catalog() if p.name == name)
        for context in (32768, 131072):
            p = plan(LLAMA3_8B, gpu, context)  # CUDA's attention keeps no score matrix: the prefill fits
            reads = p.predicted_kv_read_bytes
            assert set(reads) == {"device", "host", "disk"} and reads["device"] > 0
            assert p.predicted_peak_device_bytes <= 0.85 * gpu.device_memory_gb * 1e9
            assert (p.kv_device_mb is not None) == (reads["host"] + reads["disk"] > 0)
    laptop = plan(LLAMA3_8B, next(p for p in catalog() if p.name == "rtx4060-laptop"), 65536)
    assert laptop.kv_device_mb is not None and laptop.predicted_kv_read_bytes["host"] > 0
    # the same model on a CPU keeps the score matrix: at 128K it needs more than a Raspberry Pi has
    with pytest.raises(EdgetokError, match="nothing fits on test"):
        plan(LLAMA3_8B, profile(), 131072)


def test_sliding_layers_hold_their_windows():
    """Gemma 3's sliding layers hold a window (and the cache's slack), not the context: only the
    full-attention layers grow with it, and only they are budgeted."""
    from edgetok.devices.planner import WINDOW_SLACK, kv_layout
    from edgetok.models.config import FULL, SLIDING, ModelConfig

    cfg = ModelConfig(arch="gemma3", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4,
                      num_kv_heads=1, head_dim=16, max_context=32768, sliding_window=512,
                      layer_types=[SLIDING] * 5 + [FULL], rope_local_theta=10000.0, qk_norm=True, sandwich_norms=True,
                      norm_offset=1.0, hidden_act="gelu_tanh", embed_scale=True, query_pre_attn_scalar=16.0)
    per_token = 2 * 1 * 16 * 4
    assert kv_layout(cfg, 32768) == (5 * (512 + WINDOW_SLACK) * per_token, 32768 * per_token)
    assert kv_layout(cfg, 100) == (5 * 100 * per_token, 100 * per_token)
    assert kv_layout(SMOLLM2, 4096)[0] == 0
