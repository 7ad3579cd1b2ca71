"""The optimum-onnx peer: its own environment (`make optimum-env`), its export, its runner, and
edgetok running the same export. Tests that need the environment skip without it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgetok
from edgetok.bench import artifacts, harness, optimum_env, systems
from edgetok.bench.forced import generate
from edgetok.bench.record import read_logits, write_ids
from edgetok.bench.systems import System
from edgetok.errors import EdgetokError
from edgetok.models.sources import load_source
from edgetok.runtimes.engine import GenerationConfig

needs_env = pytest.mark.skipif(not optimum_env.ready(), reason=f"optimum-onnx's environment is not built ({optimum_env.MAKE_TARGET})")


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    monkeypatch.setenv(optimum_env.PYTHON_VAR, str(tmp_path / "missing" / "python"))
    yield
    optimum_env._probe.cache_clear()


def test_a_missing_environment_is_one_sentence_naming_the_make_target(no_env, tiny_folder):
    assert systems.parse_peers("optimum,transformers") == ["optimum", "transformers"]
    skipped = systems.skipped_peers(["optimum"])
    assert list(skipped) == ["optimum-onnx"] and "run: make optimum-env" in skipped["optimum-onnx"]
    source = load_source(str(tiny_folder))
    assert systems.peer_systems(str(tiny_folder), source, ["optimum"]) == []
    with pytest.raises(EdgetokError, match="make optimum-env"):
        artifacts.optimum_folder(str(tiny_folder), source)


def run_peer(system: System, prompt: list[int], n: int, tmp_path, follow: list[int] | None = None) -> tuple[dict, np.ndarray]:
    """The peer's process as the bench runs it → its JSON and its logits rows."""
    ids, logits = tmp_path / "prompt.json", tmp_path / f"{system.runner}.npy"
    write_ids(ids, prompt)
    follow_file = None
    if follow is not None:
        follow_file = tmp_path / "follow.json"
        write_ids(follow_file, follow)
    out = harness.run_process(system.command(ids, n, 1, follow_file, logits))
    assert "error" not in out, out
    return out, read_logits(logits).numpy()


@needs_env
def test_the_peer_on_a_tiny_model_follows_the_reference(tiny_folder, tmp_path):
    """optimum's export of the fp32 HF folder, run by optimum's ORTModelForCausalLM, fed the exact
    run's tokens: its next tokens are the reference's; edgetok's backend on the same export agrees."""
    source = load_source(str(tiny_folder))
    [system] = systems.peer_systems(str(tiny_folder), source, ["optimum"])
    folder = artifacts.optimum_folder(str(tiny_folder), source)
    assert system.model == str(folder) and system.python == str(optimum_env.python())
    assert artifacts.optimum_folder(str(tiny_folder), source) == folder  # built once, then found

    prompt, n = harness.prompt_tokens(source.tokenizer, 40), 6
    cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True)
    ref, ref_rows = generate(edgetok.load(str(tiny_folder), backend="torch"), prompt, cfg, None)
    out, rows = run_peer(system, prompt, n, tmp_path, follow=ref.tokens)
    assert out["stats"]["kv"]["kind"].startswith("optimum") and out["stats"]["decode_steps"] == n - 1
    q = harness.quality(torch.from_numpy(np.stack(ref_rows)), torch.from_numpy(rows))
    assert q["greedy_agreement"] == 1.0 and q["max_abs_dlogit"] < 1e-3
    mine, _ = generate(edgetok.load(str(folder)), prompt, cfg, None)
    assert mine.tokens == ref.tokens


@needs_env
@pytest.mark.slow
def test_smollm2_optimum_export_run_by_edgetok_greedy_matches_optimum(tmp_path):
    """SmolLM2's optimum export: edgetok's backend and optimum's ORTModelForCausalLM, each decoding
    greedily on its own for 32 tokens, choose the same tokens."""
    source = load_source("smollm2")
    [system] = systems.peer_systems("smollm2", source, ["optimum"])
    prompt, n = harness.prompt_tokens(source.tokenizer, 300), 32
    theirs, _ = run_peer(system, prompt, n, tmp_path)
    mine, _ = generate(edgetok.load(system.model, threads=2), prompt, GenerationConfig(max_new_tokens=n, ignore_eos=True), None)
    assert mine.tokens == theirs["tokens"], json.dumps({"edgetok": mine.tokens, "optimum": theirs["tokens"]})
