"""The Backend protocol, the same cases against every backend.

Each case runs a backend beside the reference (the torch backend, fp32, on the same weights) on a
tiny random model: greedy equality where the format is exact, truncate and rollback, reuse of a
prompt prefix by the engine, the logits of several positions at once, and declared capabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import run_cli

import edgetok
from edgetok.errors import EdgetokError
from edgetok.runtimes.backends.base import BATCH, CACHE_ATTENTION, PREFIX_STATE, PRUNE, ROLLBACK, SEQUENCES, TREE
from edgetok.runtimes.kv import KVConfig
from edgetok.runtimes.prune import PrunePlan
from edgetok.runtimes.speculation import DraftTree


@dataclass
class Case:
    kind: str
    model: edgetok.Model  # the backend under test
    reference: edgetok.Model  # torch, fp32, the same weights
    atol: float  # on logits: what the format's arithmetic allows (llama.cpp keeps K/V in f16)

    @property
    def backend(self):
        return self.model.engine.backend

    @property
    def prompt(self) -> list[int]:
        """70 random ids of the model's vocabulary."""
        vocab = self.backend.config.vocab_size
        return torch.randint(3, vocab, (70,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module")
def exports(tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("conformance")
    onnx, gguf = folder / "onnx-fp32", folder / "tiny-f32.gguf"
    for args in (["--format", "onnx", "--weights", "fp32", "--prune-after-layer", "0", "-o", onnx],
                 ["--format", "gguf", "--quant", "f32", "-o", gguf]):
        r = run_cli("export", tiny_folder, *args, "--no-verify")
        assert r.exit_code == 0, r.output
    return {"onnx": onnx, "gguf": gguf}


KINDS = ["torch", "torch-tiered", "onnxruntime", "onnxruntime-tiered", "optimum", "llamacpp"]


@pytest.fixture(scope="module", params=KINDS)
def case(request, tiny_folder, exports, tiny_optimum_folder) -> Case:
    exact = edgetok.KVConfig(budget="100%", chunk_sizes=(8, 16))  # tiered, but every chunk attended
    reference = edgetok.load(str(tiny_folder), backend="torch")
    if request.param == "torch":
        return Case(request.param, reference, reference, 0.0)
    if request.param == "torch-tiered":
        return Case(request.param, edgetok.load(str(tiny_folder), backend="torch", kv=exact), reference, 1e-4)
    if request.param == "optimum":  # optimum's layout of the fp32 export (conftest.optimum_layout)
        return Case(request.param, edgetok.load(str(tiny_optimum_folder)), reference, 1e-3)
    if request.param.startswith("onnxruntime"):
        kv = exact if request.param.endswith("tiered") else None
        return Case(request.param, edgetok.load(str(exports["onnx"]), kv=kv), reference, 1e-3)
    gguf_reference = edgetok.load(str(exports["gguf"]), backend="torch")  # the torch backend on the GGUF's own weights
    return Case(request.param, edgetok.load(str(exports["gguf"]), backend="llamacpp"), gguf_reference, 0.05)


def prefill(backend, tokens: list[int], piece: int = 32):
    cache = backend.new_cache()
    for i in range(0, len(tokens), piece):
        logits = backend.forward(tokens[i : i + piece], cache)
    return cache, logits


def test_forward_returns_float32_rows_of_the_vocabulary(case):
    prompt = case.prompt
    cache, logits = prefill(case.backend, prompt)
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32
    assert logits.shape == (1, case.backend.config.vocab_size)


def test_greedy_tokens_equal_the_reference(case):
    for prompt in ("The quick brown fox", "def add(a, b):"):
        want = case.reference.generate(prompt, max_new_tokens=16, ignore_eos=True).tokens
        assert case.model.generate(prompt, max_new_tokens=16, ignore_eos=True).tokens == want


def test_the_logits_of_several_positions_equal_one_at_a_time(case):
    prompt = case.prompt
    backend = case.backend
    cache, _ = prefill(backend, prompt[:40])
    many = backend.forward(prompt[40:46], cache, last=4)
    assert many.shape == (4, backend.config.vocab_size)
    cache, _ = prefill(backend, prompt[:40])
    one = [backend.forward([t], cache)[-1] for t in prompt[40:46]][-4:]
    np.testing.assert_allclose(many, np.stack(one), atol=max(case.atol, 1e-4))


def test_rollback_then_another_continuation_equals_a_fresh_run(case):
    """Truncate drops the rejected tokens (speculative decoding's rollback): running other tokens
    after it gives what a cache that never saw the rejected ones gives."""
    prompt = case.prompt
    backend = case.backend
    cache, _ = prefill(backend, prompt[:48])
    backend.end_prefill(cache)
    backend.forward(prompt[48:52], cache, last=4)  # a draft, then rejected
    assert ROLLBACK in backend.capabilities and backend.truncate(cache, 48) == 48
    got = backend.forward([5, 6, 7], cache, last=3)
    fresh, _ = prefill(backend, prompt[:48])
    backend.end_prefill(fresh)
    want = backend.forward([5, 6, 7], fresh, last=3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_truncate_before_decoding_keeps_a_reusable_prefix(case):
    prompt = case.prompt
    backend = case.backend
    cache, _ = prefill(backend, prompt)
    kept = backend.truncate(cache, 40)
    assert 0 <= kept <= 40
    got = backend.forward(prompt[kept:60], cache)
    _, want = prefill(backend, prompt[:60], piece=60)
    np.testing.assert_allclose(got, want, atol=max(case.atol, 1e-4))


def test_the_engine_reuses_a_prompt_prefix_with_the_same_tokens(case):
    first = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)
    case.model.generate(first, max_new_tokens=4)
    second = case.model.generate(first + " and then", max_new_tokens=8, ignore_eos=True)
    fresh = case.reference.generate(first + " and then", max_new_tokens=8, ignore_eos=True)
    assert second.tokens == fresh.tokens
    if not case.kind.endswith("tiered"):  # the tiered cache fitted its chunks to the first prompt: it starts over
        assert second.stats.reused_prompt_tokens > 0


def test_capabilities_are_declared_and_honest(case, tmp_path):
    prompt = case.prompt
    backend = case.backend
    assert isinstance(backend.capabilities, frozenset)
    assert backend.capabilities <= {PRUNE, PREFIX_STATE, ROLLBACK, SEQUENCES, BATCH, CACHE_ATTENTION, TREE}
    if CACHE_ATTENTION in backend.capabilities:  # its caches fold in the unread chunks' summaries
        tiered = backend.new_cache(KVConfig(budget="50%", summaries="on"))
        assert backend.forward(prompt[:40], tiered, last=1).shape == (1, backend.config.vocab_size)
    elif backend.name == "onnxruntime":
        with pytest.raises(EdgetokError, match="torch backend"):
            backend.new_cache(KVConfig(budget="50%", summaries="on"))
    cache, _ = prefill(backend, prompt[:40])
    if PREFIX_STATE in backend.capabilities:
        state = backend.save_prefix(cache)
        fresh = backend.new_cache()
        backend.load_prefix(fresh, state)
        np.testing.assert_allclose(backend.forward(prompt[40:44], fresh), backend.forward(prompt[40:44], cache), atol=1e-5)
    else:
        with pytest.raises(EdgetokError):
            backend.save_prefix(cache)
        with pytest.raises(EdgetokError, match="--kv-store"):
            edgetok.load(str(case.model.source.path), backend=backend.name, kv_store=tmp_path)
    plan = PrunePlan(0.5, backend.prune_after_layer if backend.prune_after_layer is not None else 0)
    if PRUNE in backend.capabilities:
        pruned = backend.prefill_pruned(prompt, backend.new_cache(), plan, 32)
        assert pruned.logits.shape == (backend.config.vocab_size,) and len(pruned.kept) < len(prompt)
    else:
        with pytest.raises(EdgetokError, match="--prune-prompt"):
            case.model.generate("The quick brown fox", max_new_tokens=2, prune_prompt=0.5)
    # SEQUENCES: caches live side by side; BATCH: one forward over two sequences equals each alone
    if SEQUENCES in backend.capabilities:
        caches = [prefill(backend, prompt[:n])[0] for n in (40, 30, 40, 30)]
        for c in caches:
            backend.end_prefill(c)
        alone = np.concatenate([backend.forward(prompt[40:41], caches[0]), backend.forward(prompt[30:31], caches[1])])
        if BATCH in backend.capabilities:
            np.testing.assert_allclose(backend.forward_batch([prompt[40], prompt[30]], caches[2:]), alone, atol=1e-4)
    if BATCH not in backend.capabilities:
        with pytest.raises(EdgetokError, match="batch"):
            backend.forward_batch([prompt[41]], [cache])
    # TREE: a draft tree's branches get their chains' logits, where the cache takes trees
    tree = DraftTree((prompt[40], prompt[41], prompt[50], prompt[42]), (-1, 0, 0, 1))  # two branches
    tree_cache, chain_cache = (prefill(backend, prompt[:40])[0] for _ in range(2))
    for c in (tree_cache, chain_cache):
        backend.end_prefill(c)
    if TREE in backend.capabilities and tree_cache.takes_trees:
        rows = backend.forward_tree(tree, tree_cache)
        chain = backend.forward([prompt[40], prompt[41], prompt[42]], chain_cache, last=3)
        np.testing.assert_allclose(rows[[0, 1, 3]], chain, atol=1e-4)
    else:
        with pytest.raises(EdgetokError, match="--draft-width"):
            backend.forward_tree(tree, tree_cache)
