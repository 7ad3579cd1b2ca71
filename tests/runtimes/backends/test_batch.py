"""Batched decoding (BATCH) on the onnxruntime backend: one graph run over several sequences gives
each the logits its own forward gives, sequences join and leave between steps, and a cache that
decoded in the batch is whole again for prompt reuse and rollback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_cli

import edgetok
from edgetok.runtimes.backends.base import BATCH, SEQUENCES


@pytest.fixture(scope="module")
def onnx_model(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "onnx-fp32"
    r = run_cli("export", tiny_folder, "--format", "onnx", "--weights", "fp32", "-o", out, "--no-verify")
    assert r.exit_code == 0, r.output
    return edgetok.load(str(out))


def ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefilled(backend, prompt: list[int]):
    cache = backend.new_cache()
    logits = backend.forward(prompt, cache)
    backend.end_prefill(cache)
    return cache, int(np.argmax(logits[-1]))


def test_batched_steps_equal_single_forwards_as_sequences_join_and_leave(onnx_model):
    backend = onnx_model.engine.backend
    assert {BATCH, SEQUENCES} <= backend.capabilities
    vocab = backend.config.vocab_size
    prompts = [ids(n, seed, vocab) for seed, n in enumerate((5, 40, 17, 90))]
    # the reference: each sequence alone, greedy, 12 steps
    alone = []
    for p in prompts:
        cache, token = prefilled(backend, p)
        rows = []
        for _ in range(12):
            logits = backend.forward([token], cache)[-1]
            rows.append(logits)
            token = int(np.argmax(logits))
        alone.append(rows)
    # together: sequence s joins at step 3·s and sequence 1 leaves after step 6 (then returns)
    state = [prefilled(backend, p) for p in prompts]
    caches, tokens = [c for c, _ in state], [t for _, t in state]
    steps = [0] * len(prompts)
    for step in range(24):
        members = [s for s in range(len(prompts)) if step >= 3 * s and steps[s] < 12 and not (s == 1 and 6 <= step < 9)]
        if not members:
            continue
        logits = backend.forward_batch([tokens[s] for s in members], [caches[s] for s in members])
        assert logits.shape == (len(members), vocab)
        for row, s in zip(logits, members):
            np.testing.assert_allclose(row, alone[s][steps[s]], atol=1e-4, rtol=0)
            tokens[s] = int(np.argmax(row))
            steps[s] += 1
    assert steps == [12] * len(prompts)
    # once the backend touches a cache that decoded in the batch, it holds every token again; a
    # rollback into the batched tokens keeps what came before, and a single forward continues it
    for s, cache in enumerate(caches):
        backend.cache_stats(cache)
        assert cache.length == len(prompts[s]) + 12
    cache, n = caches[2], len(prompts[2])
    assert backend.truncate(cache, n + 5) == n + 5
    redo = backend.forward([0], cache)
    assert redo.shape == (1, vocab) and cache.length == n + 6


def test_a_batch_of_one_and_growth_past_the_buffers(onnx_model):
    """One sequence decodes far past the batch's first capacity (the buffers grow under it)."""
    backend = onnx_model.engine.backend
    prompt = ids(3, 9, backend.config.vocab_size)
    a, token_a = prefilled(backend, prompt)
    b, token_b = prefilled(backend, prompt)
    for _ in range(200):
        (row,) = backend.forward_batch([token_a], [a])
        single = backend.forward([token_b], b)[-1]
        np.testing.assert_allclose(row, single, atol=1e-4, rtol=0)
        token_a = token_b = int(np.argmax(single))


def test_a_long_sequence_joining_a_smaller_batch_keeps_the_rows(onnx_model):
    """Rows were allocated for four sequences; two remain, and a sequence longer than the buffers
    joins: the buffers grow in length without losing rows (they once shrank to 2·rows in use)."""
    backend = onnx_model.engine.backend
    vocab = backend.config.vocab_size
    short = [prefilled(backend, ids(6, seed, vocab)) for seed in range(4)]
    backend.forward_batch([t for _, t in short], [c for c, _ in short])  # four rows
    backend.forward_batch([t for _, t in short[:1]], [c for c, _ in short[:1]])  # three leave
    long_cache, long_token = prefilled(backend, ids(150, 7, vocab))  # past the batch's capacity
    want = backend.forward([long_token], prefilled(backend, ids(150, 7, vocab))[0])[-1]
    rows = backend.forward_batch([short[0][1], long_token], [short[0][0], long_cache])
    np.testing.assert_allclose(rows[1], want, atol=1e-4, rtol=0)
