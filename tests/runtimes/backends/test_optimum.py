"""optimum's ONNX exports on edgetok's onnxruntime backend (runtimes/backends/optimum.py).

The graph here is the tiny Llama in optimum's layout built without optimum (conftest.optimum_layout);
tests/bench/test_optimum_peer.py runs SmolLM2's real optimum export against optimum's own runtime.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli

import edgetok
from edgetok.errors import EdgetokError
from edgetok.models.sources import OPTIMUM, load_source
from edgetok.runtimes.kv import ContiguousCache, KVConfig


@pytest.fixture(scope="module")
def reference(tiny_folder):
    return edgetok.load(str(tiny_folder), backend="torch")


@pytest.fixture(scope="module")
def optimum(tiny_optimum_folder):
    return edgetok.load(str(tiny_optimum_folder))


def test_a_folder_without_a_manifest_is_read_as_optimum_s(tiny_optimum_folder, tiny_folder):
    source = load_source(str(tiny_optimum_folder))
    hf = load_source(str(tiny_folder))
    assert source.format == OPTIMUM
    assert source.config.to_dict() == hf.config.to_dict()
    assert source.tokenizer.encode("The quick brown fox") == hf.tokenizer.encode("The quick brown fox")


def test_greedy_tokens_equal_the_torch_reference(optimum, reference):
    assert optimum.choice.backend == "onnxruntime"
    for prompt in ("The quick brown fox", "def add(a, b):\n    return a + b\n" * 12):
        want = reference.generate(prompt, max_new_tokens=24, ignore_eos=True).tokens
        assert optimum.generate(prompt, max_new_tokens=24, ignore_eos=True).tokens == want


def test_the_logits_equal_the_reference_as_the_cache_grows(optimum, reference):
    """A cache with few spare slots grows (and the graph is bound again) many times; the slots it
    masks never change a logit."""
    backend, ref = optimum.engine.backend, reference.engine.backend
    c = backend.config
    small = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, capacity=4, growth=0.0, slack=3)
    ref_cache = ref.new_cache()
    tokens = torch.randint(3, c.vocab_size, (60,), generator=torch.Generator().manual_seed(5)).tolist()
    pieces = [tokens[:5], *([t] for t in tokens[5:30]), tokens[30:41], *([t] for t in tokens[41:])]
    for piece in pieces:
        got = backend.forward(piece, small, last=len(piece))
        want = ref.forward(piece, ref_cache, last=len(piece))
        np.testing.assert_allclose(got, want, atol=1e-3)
    assert small.length == 60 and small.capacity > 4


def test_edgetok_run_runs_the_folder(tiny_optimum_folder):
    r = run_cli("run", tiny_optimum_folder, "-p", "The quick brown fox", "-n", "8", "--json")
    assert r.exit_code == 0, r.output
    assert '"finish_reason"' in r.stdout


def test_what_the_graph_cannot_run_is_refused_in_one_sentence(optimum, tiny_optimum_folder):
    with pytest.raises(EdgetokError, match="exact KV cache only"):
        edgetok.load(str(tiny_optimum_folder), kv=KVConfig(budget="50%"))
    with pytest.raises(EdgetokError, match="exact KV cache only"):
        optimum.engine.backend.new_cache(KVConfig(budget="50%"))
    with pytest.raises(EdgetokError, match="--prune-prompt"):
        optimum.generate("The quick brown fox", max_new_tokens=2, prune_prompt=0.5)
    r = run_cli("run", tiny_optimum_folder, "-p", "hi", "-n", "2", "--kv-budget", "25%")
    assert r.exit_code != 0 and "exact KV cache only" in r.output


def test_a_graph_with_other_names_is_refused(tiny_optimum_folder, tmp_path):
    """edgetok's own graph without its manifest is not optimum's: the sentence names the export command."""
    folder = tmp_path / "no-manifest"
    folder.mkdir()
    export = tiny_optimum_folder.parent / "edgetok"
    for f in ("model.onnx", "model.onnx.data"):
        shutil.copy(export / f, folder / f)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_optimum_folder / f, folder / f)
    with pytest.raises(EdgetokError, match="optimum-cli export onnx"):
        edgetok.load(str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(EdgetokError, match="config.json"):
        edgetok.load(str(folder))
