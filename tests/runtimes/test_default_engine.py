"""The default engine: with no engine options a model runs on its ONNX export (built once, under
$EDGETOK_HOME/exports), long prompts get the tiered cache, and --verbose / --json say what and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgetok
from edgetok.exporters.default import default_export, export_folder
from edgetok.kernels import ort_ops
from edgetok.models.sources import load_source
from edgetok.runtimes.choice import LongPrompts
from edgetok.runtimes.engine import Engine
from edgetok.runtimes.kv import KVConfig
from tests.conftest import make_hf_model, make_tokenizer_files, run_cli

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture()
def fresh_home(tmp_path, monkeypatch) -> Path:
    """A home of its own, so builds are seen from the start."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGETOK_HOME", str(home))
    return home


def test_the_default_engine_is_the_export_and_decodes_as_float_activations_would(tiny_folder, fresh_home, tmp_path):
    model = edgetok.load(str(tiny_folder))
    assert model.choice.backend == "onnxruntime" and model.engine.backend.name == "onnxruntime"
    assert model.choice.weights.startswith("int4 weights, float activations")
    assert Path(model.choice.artifact).parent == fresh_home / "exports"
    manifest = model.source.manifest
    assert (manifest.weights, manifest.activations) == ("int4", "float")
    # the layers' linears take float activations (edgetok's MatMulQ4), the head int8 (MatMulNBits level 4)
    graph = onnx.load(str(Path(model.choice.artifact) / "model.onnx"), load_external_data=False).graph
    levels = {n.input[1].split(".weight")[0].split(".")[-1]: a.i for n in graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {"lm_head": 4}
    assert sum(n.op_type == ort_ops.MATMUL_Q4 for n in graph.node) == 4 * model.config.num_layers  # qkv, o, gate_up, down
    # and every layer's attention is edgetok's (decode steps read each KV head's cache once per group)
    assert [n.domain for n in graph.node if n.op_type == ort_ops.ATTENTION] == [ort_ops.DOMAIN] * model.config.num_layers
    # The same graph with float activations in the head too (ONNX Runtime's slow kernel): the head's
    # rescored top logits make the fast graph's greedy tokens those of the all-float one.
    graph = onnx.load(str(Path(model.choice.artifact) / "model.onnx"), load_external_data=False)
    for n in graph.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    slow = tmp_path / "all-float"
    slow.mkdir()
    onnx.save(graph, slow / "model.onnx")
    os.link(Path(model.choice.artifact) / "model.onnx.data", slow / "model.onnx.data")
    from dataclasses import replace

    from edgetok.runtimes.backends.onnxruntime import OnnxBackend

    fast, float_ = model.engine.backend, OnnxBackend(replace(model.source, path=slow))
    ids = model.tokenizer.encode(PROMPT * 3)
    a, b = fast.forward(ids, fast.new_cache(), last=len(ids)), float_.forward(ids, float_.new_cache(), last=len(ids))
    assert (a.argmax(-1) == b.argmax(-1)).all()
    np.testing.assert_allclose(a.max(-1), b.max(-1), atol=1e-4)  # the top logit itself is the float one
    assert np.abs(a - b).max() > 1e-3  # (the rest is the int8 kernel's: the test sees a difference)


def test_per_head_selection_and_summaries_run_on_the_default_engine(tiny_folder, fresh_home):
    """A cache that computes attention itself (per-KV-head selection, summaries) is what the default
    export's attention operator hands each layer to: they stay on ONNX Runtime where the CPU runs
    that operator, and choose the torch backend, saying why, where it does not."""
    for kv, asked in ((KVConfig(budget="25%", summaries="on"), ("summaries", "on")),
                      (KVConfig(budget="25%", selection="head"), ("selection", "head"))):
        model = edgetok.load(str(tiny_folder), kv=kv)
        if ort_ops.attention_available():
            assert model.choice.backend == "onnxruntime" and model.engine.backend.attends_through
            long = " ".join([PROMPT] * 20)  # past the exact cache's length: the tiered cache runs
            assert model.generate(long, max_new_tokens=2).stats.kv[asked[0]] == asked[1]
        else:
            assert model.choice.backend == "torch" and "torch backend" in model.choice.reasons[0]
    assert edgetok.load(str(tiny_folder), kv=KVConfig(budget="25%")).choice.backend == "onnxruntime"


def test_the_export_is_built_once_and_a_damaged_one_is_rebuilt(tiny_folder, fresh_home):
    source = load_source(str(tiny_folder))
    folder = default_export(source).path
    stamp = (folder / "model.onnx.data").stat().st_mtime_ns
    assert default_export(source).path == folder and (folder / "model.onnx.data").stat().st_mtime_ns == stamp
    with open(folder / "model.onnx.data", "r+b") as f:  # one flipped byte in the weights
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    rebuilt = default_export(source)
    assert rebuilt.path == folder and (folder / "model.onnx.data").stat().st_mtime_ns != stamp
    assert edgetok.load(str(tiny_folder)).generate(PROMPT, max_new_tokens=4).finish_reason in ("eos", "length")
    assert sorted(p.name for p in (fresh_home / "exports").iterdir()) == [folder.name, f"{folder.name}.lock"]


def test_other_weights_are_another_export(tmp_path, tiny_folder, fresh_home):
    other = tmp_path / "other"
    other.mkdir()
    make_tokenizer_files(other)
    make_hf_model("llama", edgetok.load(str(tiny_folder), backend="torch").config.vocab_size, seed=7).save_pretrained(other)
    assert export_folder(load_source(str(other))) != export_folder(load_source(str(tiny_folder)))


def test_two_processes_building_at_once_share_one_export(tiny_folder, fresh_home):
    code = ("import sys, edgetok; m = edgetok.load(sys.argv[1]); "
            "print(m.choice.artifact, m.generate('hi', max_new_tokens=3, ignore_eos=True).tokens)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])}) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert outs[0][0] == outs[1][0]  # the same folder, the same tokens
    assert len([p for p in (fresh_home / "exports").iterdir() if p.is_dir()]) == 1


def test_options_only_one_backend_has_choose_it(tiny_folder):
    assert edgetok.load(str(tiny_folder), weights="int8").choice.backend == "torch"
    pruning = edgetok.load(str(tiny_folder), needs=frozenset({"prune"}))
    assert pruning.choice.backend == "torch" and "pruning point" in pruning.choice.reasons[0]
    assert edgetok.load(str(tiny_folder), backend="torch").choice.reasons == []


def test_run_says_which_engine_and_why(tiny_folder):
    r = run_cli("run", tiny_folder, "-p", PROMPT, "--no-chat", "-n", "3", "--json")
    assert r.exit_code == 0, r.output
    engine = json.loads(r.stdout)["engine"]
    assert engine["backend"] == "onnxruntime" and engine["kv"] == "exact" and engine["reasons"]
    r = run_cli("run", tiny_folder, "-p", PROMPT, "--no-chat", "-n", "3", "--verbose")
    assert r.exit_code == 0 and "engine: onnxruntime, int4 weights, float activations" in r.stderr
    assert "because no engine was named" in r.stderr
    r = run_cli("run", tiny_folder, "-p", PROMPT, "--no-chat", "-n", "3", "--prune-prompt", "0.5", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["engine"]["backend"] == "torch"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_long_prompt_gets_the_tiered_cache_and_a_short_one_stays_exact(tiny_folder, tiny, backend):
    m = edgetok.load(str(tiny_folder), backend=None if backend == "onnxruntime" else "torch")
    engine = Engine(m.engine.backend, m.tokenizer, long_prompts=LongPrompts(16, KVConfig(budget="100%")))
    short, long = tiny.tokenizer.encode(PROMPT)[:8], tiny.tokenizer.encode(PROMPT * 6)[:40]

    def run(ids):
        *_, result = engine.generate_ids(ids, edgetok.GenerationConfig(max_new_tokens=6, ignore_eos=True))
        return result

    assert run(short).stats.kv["kind"] == "contiguous"
    r = run(long)
    assert r.stats.kv["kind"].startswith("tiered")
    # at a full budget the tiered cache is exact: the same tokens as the same backend's exact cache
    *_, want = Engine(m.engine.backend, m.tokenizer).generate_ids(long, edgetok.GenerationConfig(max_new_tokens=6, ignore_eos=True))
    assert r.tokens == want.tokens
    assert run(short).stats.kv["kind"] == "contiguous"  # back to exact for the next short prompt
    np.testing.assert_array_equal(run(long).tokens, r.tokens)


def test_a_home_that_cannot_be_written_is_one_sentence(tiny_folder, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("EDGETOK_HOME", str(blocker / "home"))  # (root may write anywhere: a file is in the way)
    r = run_cli("run", tiny_folder, "-p", PROMPT, "-n", "2")
    assert r.exit_code == 1 and "cannot build the default export" in r.stderr and "--backend torch" in r.stderr
    assert r.stderr.count("\n") == 1 and blocker.read_text() == ""
