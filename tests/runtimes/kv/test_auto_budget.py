"""--kv-budget auto: the selection sizes itself to a coverage target, and every budgeted cache
reports what it chose and the attention it captured."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model, run_cli

from edgetok.errors import EdgetokError
from edgetok.models.config import ModelConfig
from edgetok.models.sources import Source
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.kv import KVConfig
from edgetok.runtimes.kv.config import AUTO_FLOOR, DEFAULT_COVERAGE
from edgetok.runtimes.kv.fidelity import MASS_EVERY


@pytest.fixture(scope="module")
def source():
    hf = make_hf_model("llama", vocab_size=300, seed=3, layers=4, max_positions=2048)
    weights = hf.state_dict()
    return Source("tiny", None, "hf", ModelConfig.from_hf(hf.config.to_dict()), None, lambda: weights)


PROMPT = torch.randint(0, 300, (900,), generator=torch.Generator().manual_seed(7)).tolist()
STEPS = MASS_EVERY + 2  # two sampled steps


def run(source, kv: KVConfig | None, follow: list[int] | None = None):
    backend = TorchBackend(source, kv=kv)
    cache = backend.new_cache()
    for i in range(0, len(PROMPT), 256):
        logits = torch.from_numpy(backend.forward(PROMPT[i : i + 256], cache)[-1])
    backend.end_prefill(cache)
    tokens, rows = [], []
    for s in range(STEPS):
        rows.append(logits)
        tokens.append(int(logits.argmax()) if follow is None else follow[s])
        logits = torch.from_numpy(backend.forward([tokens[-1]], cache)[-1])
    return tokens, torch.stack(rows), backend.cache_stats(cache)


@pytest.mark.parametrize("scoring", ["tokens", "bounds"])
def test_a_higher_coverage_reads_more_and_captures_more(source, scoring):
    want, want_logits, _ = run(source, None)
    got = {}
    for coverage in (0.5, 0.8, 0.97):
        _, logits, stats = run(source, KVConfig(budget="auto", coverage=coverage, scoring=scoring), follow=want)
        assert stats["coverage"] == coverage and stats["scoring"] == scoring
        # bounds rank at a temperature fitted per layer; token scores estimate shares themselves, above a floor
        assert len(stats["coverage_temperatures"]) == 4 if scoring == "bounds" else stats["auto_floor"] == AUTO_FLOOR
        assert stats["coverage_estimated"] >= coverage - 1e-3  # each selection meets its target by its estimate
        assert len(stats["budget_per_layer"]) == 4 and all(0 < b <= 1 for b in stats["budget_per_layer"])
        assert stats["captured_mass_samples"] == 2 * 4  # steps 1 and 1 + MASS_EVERY, every layer
        p = want_logits.log_softmax(-1)
        got[coverage] = (stats["budget_used"], stats["captured_mass"], (p.exp() * (p - logits.log_softmax(-1))).sum(-1).mean())
    budgets, masses, kls = zip(*(got[c] for c in (0.5, 0.8, 0.97)))
    assert budgets[0] < budgets[1] < budgets[2]
    assert masses[0] < masses[2] and masses[2] > 0.9
    assert kls[2] < kls[0]


def test_a_fixed_budget_reports_its_captured_mass_too(source):
    _, _, full = run(source, KVConfig(budget="100%"))
    assert full["captured_mass"] == pytest.approx(1.0, abs=1e-4) and full["budget_per_layer"] == [1.0] * 4
    _, _, quarter = run(source, KVConfig(budget="25%"))
    assert 0 < quarter["captured_mass"] < 1 and 0 < quarter["coverage_estimated"] < 1
    assert sum(quarter["budget_per_layer"]) / 4 == pytest.approx(quarter["budget_used"], abs=0.05)


def test_tiers_do_not_read_everything_back_to_measure(source, tmp_path):
    _, _, stats = run(source, KVConfig(budget="auto", device_mb=0.02, host_mb=0.04, disk_dir=tmp_path))
    assert "captured_mass" not in stats and stats["coverage_estimated"] > 0.8


def test_coverage_checks():
    assert KVConfig(budget="auto").coverage == DEFAULT_COVERAGE
    for bad in (dict(budget="auto", coverage=1.0), dict(budget="auto", coverage=0), dict(budget="auto", coverage=float("nan")),
                dict(budget="auto", coverage="0.9"), dict(budget="25%", coverage=0.9)):
        with pytest.raises(EdgetokError, match="coverage"):
            KVConfig(**bad)


def test_cli_auto_budget(tiny_folder):
    r = run_cli("run", str(tiny_folder), "-p", "The quick brown fox " * 40, "--no-chat", "-n", "20",
                "--kv-budget", "auto", "--kv-coverage", "0.8", "--json")
    assert r.exit_code == 0, r.output
    kv = json.loads(r.stdout)["stats"]["kv"]
    assert kv["budget"] == "auto" and kv["coverage"] == 0.8 and "budget_per_layer" in kv
    r = run_cli("run", str(tiny_folder), "-p", "hi", "--kv-coverage", "0.8")
    assert r.exit_code == 1 and "--kv-budget auto" in r.stderr


def test_token_scored_auto_reads_at_least_its_floor(source, monkeypatch):
    """Under token scores a tiny coverage target is met by a few chunks; every layer still reads
    its share of AUTO_FLOOR of the context, so the budget used is about the floor (and is less
    without it)."""
    kv = dict(budget="auto", coverage=0.05, recent_tokens=16, chunk_sizes=(16,))  # (few forced chunks)
    _, _, floored = run(source, KVConfig(**kv))
    assert floored["budget_used"] >= AUTO_FLOOR - 0.02
    monkeypatch.setattr("edgetok.runtimes.kv.tiered.AUTO_FLOOR", 0.0)
    _, _, bare = run(source, KVConfig(**kv))
    assert bare["budget_used"] < floored["budget_used"] - 0.05
