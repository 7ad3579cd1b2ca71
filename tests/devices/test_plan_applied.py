"""`edgetok run/chat/serve --plan auto|FILE|none`: the plan sets the chosen engine's provider, threads and
long-prompt KV cache; options the user gives win; bad plans, contexts and disk folders are one sentence."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace

import pytest
from conftest import run_cli

import edgetok
from edgetok.devices.planner import EXACT_UP_TO, Plan, load_plan, plan
from edgetok.errors import EdgetokError
from edgetok.models.sources import load_source
from tests.conftest import make_hf_model, make_tokenizer_files
from tests.devices.test_planner import profile

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
LONG = "The quick brown fox jumps over the lazy dog. " * 70  # ~770 tokens: chunks of up to 256 are cut


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory):
    """The tiny random Llama with a 2048-token context: long enough prompts for chunks of 256."""
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("tiny-2k")
    make_tokenizer_files(folder)
    model = make_hf_model("llama", Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(), max_positions=2048)
    model.config.eos_token_id = 2
    model.save_pretrained(folder)
    return folder


def tiered_plan(context: int = 128, **change) -> Plan:
    """A plan whose KV cache did not fit: tiers on device, host and disk (as planner.plan makes for a
    device with less memory than the cache needs; the tiny model's cache fits anything)."""
    return replace(Plan(device="small", context=context, engine="onnxruntime", execution_provider="cpu", weights="int4",
                        threads=1, kv_budget="50%", kv_bits="8", shared_memory=True, kv_device_mb=0.001,
                        kv_host_mb=0.002, kv_disk=True, predicted_peak_device_bytes=10 << 20,
                        predicted_peak_host_bytes=20 << 20, predicted_decode_tokens_per_s=50.0,
                        arithmetic=["(made by hand for the test)"]), **change)


def save(p: Plan | dict, path):
    path.write_text(json.dumps(p.to_dict() if isinstance(p, Plan) else p))
    return path


def run_json(*args):
    r = run_cli("run", *args, *([] if "-p" in args else ["-p", PROMPT]), "-n", "4", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_run_applies_the_local_plan_by_default(tiny_folder):
    out = run_json(tiny_folder)
    engine = out["engine"]
    assert engine["backend"] == "onnxruntime" and engine["plan"]["device"] == "local"
    assert engine["plan"]["context"] == load_source(str(tiny_folder)).config.max_context
    assert any("--plan auto" in r for r in engine["reasons"])
    assert engine["threads"] == engine["plan"]["threads"]
    # the tiny model's context is short: the plan keeps it exact, as before plans
    assert engine["kv"] == "exact" and out["stats"]["kv"].get("kind") in (None, "contiguous")
    r = run_cli("run", tiny_folder, "-p", PROMPT, "-n", "2", "-v")
    assert r.exit_code == 0 and "plan: local at" in r.stderr and "predicted peak" in r.stderr


def test_a_saved_plan_sets_tiers_and_the_options_given_win(long_tiny, tmp_path, monkeypatch):
    tiny_folder = long_tiny
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the plan's disk tier goes
    (tmp_path / "tmp").mkdir()
    path = save(tiered_plan(), tmp_path / "plan.json")
    out = run_json(tiny_folder, "--plan", path, "-p", LONG)
    engine, kv = out["engine"], out["stats"]["kv"]
    assert engine["plan"] == tiered_plan().to_dict() and engine["threads"] == 1
    assert engine["kv"].startswith("tiered at a 50% budget over device 0.001 MB / host 0.002 MB / disk")
    assert kv["kind"] == "tiered" and kv["budget"] == "50%" and kv["storage_bits"] == "8"
    assert kv["bytes_read_per_token"].get("disk", 0) > 0  # chunks past 2 KB of host went to disk, and were read
    assert list((tmp_path / "tmp").iterdir()) == []  # the disk tier's file is gone with the run
    # options win: threads, and a KV option replaces the plan's whole cache
    out = run_json(tiny_folder, "--plan", path, "--threads", "2", "--kv-budget", "100%")
    assert out["engine"]["threads"] == 2 and out["engine"]["kv"] == "tiered at a 100% budget"
    assert "threads" not in out["engine"]["reasons"][-1].split(" set the ")[1].split(" (")[0]
    # no plan, or an engine the options chose: no plan applied, and --verbose says why
    assert run_json(tiny_folder, "--plan", "none")["engine"]["plan"] is None
    out = run_json(tiny_folder, "--plan", path, "--backend", "torch")
    assert out["engine"]["plan"] is None and "not applied" in out["engine"]["reasons"][-1]


def test_a_short_context_plan_with_tiers_tiers_every_prompt_a_long_one_only_long_prompts(tiny_folder):
    cfg = load_source(str(tiny_folder)).config
    from edgetok.runtimes.choice import follow_plan

    assert follow_plan(tiered_plan(), cfg, None, None, False).long_prompts.above == 0
    exact_short = follow_plan(replace(tiered_plan(), kv_device_mb=None, kv_host_mb=None, kv_disk=False), cfg,
                              None, None, False)
    assert exact_short.long_prompts.above == EXACT_UP_TO  # no tiers: short prompts stay exact
    fitted = follow_plan(replace(tiered_plan(context=256), kv_budget="100%", kv_device_mb=None, kv_host_mb=None,
                                 kv_disk=False), cfg, "cpu", 3, False)
    assert fitted.long_prompts is None and (fitted.provider, fitted.threads) == ("cpu", 3)


def test_the_planner_s_own_plans_round_trip_through_a_file(tiny_folder, tmp_path):
    r = run_cli("plan", tiny_folder, "--device", "rtx4090", "--context", "64", "--out", tmp_path / "p.json")
    assert r.exit_code == 0, r.output and "--plan " + str(tmp_path / "p.json") in r.stdout
    saved = load_plan(tmp_path / "p.json")
    cfg = load_source(str(tiny_folder)).config
    assert saved == plan(cfg, next(p for p in __import__("edgetok.devices", fromlist=["catalog"]).catalog()
                                   if p.name == "rtx4090"), 64, 1)
    small = plan(cfg, profile(device_memory_gb=1.0, host_memory_gb=1.0), 256, 2)
    assert Plan.from_dict(json.loads(json.dumps(small.to_dict() | {"model": "x", "run_options": []})), "f") == small


@pytest.mark.parametrize("change, words", [
    ({"kv_budget": "150%"}, "the plan for 'small': --kv-budget 150% .* is impossible"),
    ({"kv_bits": "3"}, "--kv-bits .* must be one of"),
    ({"threads": 0}, "threads must be a whole number from 1"),
    ({"context": "long"}, "context must be a whole number"),
    ({"kv_host_mb": None}, "both numbers .* or both null"),
    ({"kv_device_mb": -4}, "kv_device_mb = -4 is absurd"),
    ({"predicted_decode_tokens_per_s": float("nan")}, "is absurd"),
    ({"execution_provider": "tpu"}, "execution_provider must be one of"),
    ({"engine": "llamacpp"}, "edgetok plans for onnxruntime with int4 weights"),
    ({"kv_disk": "yes"}, "kv_disk must be true or false"),
])
def test_a_bad_plan_file_is_one_sentence_and_runs_nothing(tiny_folder, tmp_path, change, words):
    path = save(tiered_plan().to_dict() | change, tmp_path / "bad.json")
    with pytest.raises(EdgetokError, match=words):
        load_plan(path)
    r = run_cli("run", tiny_folder, "--plan", path, "-p", PROMPT, "-n", "2")
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_missing_unknown_and_unreadable_plan_files(tiny_folder, tmp_path):
    data = tiered_plan().to_dict()
    del data["kv_budget"]
    cases = {
        save(data, tmp_path / "short.json"): "is missing kv_budget",
        save(tiered_plan().to_dict() | {"colour": 1}, tmp_path / "extra.json"): "unknown fields colour",
        save([1, 2], tmp_path / "list.json"): "is not a plan",
        tmp_path / "absent.json": "does not exist",
    }
    (tmp_path / "broken.json").write_bytes(b"\xff{not json")
    cases[tmp_path / "broken.json"] = "not a readable JSON plan"
    for path, words in cases.items():
        r = run_cli("run", tiny_folder, "--plan", path, "-p", PROMPT, "-n", "2")
        assert r.exit_code == 1 and r.stderr.count("\n") == 1 and words in r.stderr, r.output


def test_a_plan_beyond_the_model_s_context_is_refused(tiny_folder, tmp_path):
    path = save(tiered_plan(context=100_000), tmp_path / "long.json")
    r = run_cli("chat", tiny_folder, "--plan", path, input="hello\n")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert "plans for 100000 tokens of context, beyond the model's 256" in r.stderr
    r = run_cli("plan", tiny_folder, "--context", "100000", "--out", tmp_path / "p.json")
    assert r.exit_code == 1 and "is impossible" in r.stderr and not (tmp_path / "p.json").exists()


def test_a_plan_whose_disk_folder_is_not_writable_is_refused_before_loading(tiny_folder, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))  # (a folder under a file: writable by no one)
    path = save(tiered_plan(), tmp_path / "plan.json")
    r = run_cli("run", tiny_folder, "--plan", path, "-p", PROMPT, "-n", "2")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "not a writable folder" in r.stderr, r.output
    with pytest.raises(EdgetokError, match="not a writable folder"):
        edgetok.load(str(tiny_folder), plan=tiered_plan())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "plan.json"]


def test_unknown_devices_and_bad_profiles_leave_no_plan_behind(tiny_folder, tmp_path):
    bad = save(profile().to_dict() | {"host_memory_gb": 1e9}, tmp_path / "absurd.json")
    data = profile().to_dict()
    del data["disk_read_gb_s"]
    short = save(data, tmp_path / "short.json")
    for device, words in (("rtx9090", "unknown device 'rtx9090'"), (bad, "host_memory_gb = 1000000000.0 is absurd"),
                          (short, "is missing disk_read_gb_s")):
        r = run_cli("plan", tiny_folder, "--device", device, "--out", tmp_path / "p.json")
        assert r.exit_code == 1 and r.stderr.count("\n") == 1 and words in r.stderr, r.output
        assert not (tmp_path / "p.json").exists()
