"""Every run's --json names each lossy knob and its estimated effect (edgetok/fidelity.py)."""

from __future__ import annotations

import json

from conftest import run_cli

from edgetok.fidelity import run_fidelity


def fidelity(tiny_folder, *args):
    r = run_cli("run", str(tiny_folder), "-p", "The quick brown fox jumps " * 30, "--no-chat", "-n", "20", "--json",
                "--backend", "torch", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["stats"]["fidelity"]


def test_an_exact_run_says_every_knob_is_exact(tiny_folder):
    f = fidelity(tiny_folder)
    assert f["weights"]["exact"] and f["kv_budget"] == {"exact": True} and f["kv_bits"] == {"exact": True}
    assert f["pruning"] == {"exact": True}


def test_a_budget_reports_its_captured_mass_and_pruning_its_kept_share(tiny_folder):
    f = fidelity(tiny_folder, "--kv-budget", "auto", "--kv-coverage", "0.8")
    assert f["kv_budget"]["budget"] == "auto" and f["kv_budget"]["coverage_target"] == 0.8
    assert 0 < f["kv_budget"]["captured_mass"] <= 1 and not f["kv_budget"]["exact"]
    assert f["kv_budget"]["scoring"] == "tokens"  # every key in RAM: chunks ranked by their tokens' scores
    assert f["kv_bits"] == {"stored": "auto", "exact": False, "attention_reads": "bf16"}
    f = fidelity(tiny_folder, "--prune-prompt", "0.5")
    assert 0.45 < f["pruning"]["kept_fraction"] < 0.65 and f["pruning"]["after_layer"] >= 0
    f = fidelity(tiny_folder, "--weights", "int8")
    assert f["weights"]["runtime"] == "int8" and f["weights"]["parity"] is None  # not measured: says so


def test_tiers_report_the_selections_estimate():
    kv = {"kind": "tiered", "budget": "25%", "budget_used": 0.26, "storage_bits": "8", "coverage_estimated": 0.93,
          "scoring": "bounds"}
    f = run_fidelity({"exact": True}, kv, {}, 100)
    assert f["kv_budget"]["captured_mass_estimated"] == 0.93 and f["kv_bits"]["stored"] == "8"
    assert f["kv_budget"]["scoring"] == "bounds"
    f = run_fidelity({"exact": True}, {"kind": "llama.cpp (q8_0)"}, {}, 100)
    assert f["kv_bits"] == {"type": "q8_0", "exact": False}
