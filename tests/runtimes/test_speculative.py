"""Speculative decoding (--speculate): drafters, the adaptive draft length, the accept rule, rollback
in every cache, and greedy output equal to plain decoding's on every backend.

Tiny random models for speed; the real SmolLM2 for one slow integration test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import kv_rows, run_cli

import edgetok
from edgetok.errors import EdgetokError
from edgetok.runtimes.backends.base import TREE
from edgetok.runtimes.engine import GenerationConfig, Result
from edgetok.runtimes.kv import ContiguousCache, KVCache, KVConfig, TieredCache
from edgetok.runtimes.sampling import SamplingParams, apply_repetition_penalty, filter_logits, new_generator, sample, softmax
from edgetok.runtimes.speculation import DraftControl, DraftTree, PromptLookup, TokenRecycling
from edgetok.runtimes.speculation.control import MISSES_BEFORE_PAUSE, PAUSE_MAX, PAUSE_MIN

# Greedy speculative output may leave plain decoding's only where logits computed for several
# positions at once round differently from one at a time: at a near-tie of the reference's top two.
EPSILON = {"torch": 1e-3, "torch-tiered": 1e-3, "onnxruntime": 1e-3, "onnxruntime-tiered": 1e-3, "default": 1e-3,
           "default-tiered": 1e-3, "llamacpp": 0.05}

PROMPT_SETS = {
    "input-grounded": [
        "Here is a text.\nThe quick brown fox jumps over the lazy dog. Émile paid 12,345 € for a café near the station.\n"
        "Quote its first sentence: The quick brown fox",
        "Document: def add(a, b):\n    return a + b\nThe quick brown fox jumps over the lazy dog.\n"
        "Summary of the document: The quick",
        "Edit the text, fox → dog: The quick brown fox jumps over the lazy dog. The quick brown fox paid 12,345 €.\n"
        "Edited: The quick brown dog",
    ],
    "code": [
        "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def add(self, other):\n",
    ],
    "chat": [
        [{"role": "user", "content": "Hello! Where is the café near the station?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the fox and the dog."}],
    ],
}


EXACT_LOGITS = ("torch", "torch-tiered", "onnxruntime", "onnxruntime-tiered")  # float kernels throughout


# -- real components: a tiny random model on every backend ---------------------------------------
# default: the engine `edgetok run MODEL` picks (int4 weights, float activations, ONNX Runtime)
KINDS = ["torch", "torch-tiered", "onnxruntime", "onnxruntime-tiered", "default", "default-tiered", "llamacpp"]
EXACT_TIERED = edgetok.KVConfig(budget="100%", chunk_sizes=(8, 16))  # tiered, every chunk attended: seals often


@pytest.fixture(scope="module")
def exported(tiny_folder, tmp_path_factory):
    """The tiny model as an fp32 ONNX export and an f32 GGUF."""
    folder = tmp_path_factory.mktemp("speculative")
    onnx, gguf = folder / "onnx", folder / "tiny.gguf"
    for args in (["--format", "onnx", "--weights", "fp32", "-o", onnx], ["--format", "gguf", "--quant", "f32", "-o", gguf]):
        r = run_cli("export", tiny_folder, *args, "--no-verify")
        assert r.exit_code == 0, r.output
    return {"onnx": str(onnx), "gguf": str(gguf)}


@pytest.fixture(scope="module", params=KINDS)
def kind(request, tiny_folder, exported) -> tuple[str, edgetok.Model]:
    name = request.param
    if name.startswith("torch"):
        return name, edgetok.load(str(tiny_folder), backend="torch", kv=EXACT_TIERED if name.endswith("tiered") else None)
    if name.startswith("onnxruntime"):
        return name, edgetok.load(exported["onnx"], kv=EXACT_TIERED if name.endswith("tiered") else None)
    if name.startswith("default"):
        m = edgetok.load(str(tiny_folder), kv=EXACT_TIERED if name.endswith("tiered") else None)
        assert m.choice.weights.startswith("int4 weights, float activations"), m.choice
        return name, m
    return name, edgetok.load(exported["gguf"], backend="llamacpp")


def generate(m: edgetok.Model, prompt, drafter=None, **options) -> Result:
    """A fresh generation (no prefix reused from the last one), as the engine runs it."""
    m.engine.reset()
    chat = not isinstance(prompt, str)
    *_, result = m.engine.generate_ids(m.encode(prompt, chat), GenerationConfig(**options), drafter=drafter)
    return result


def top2_margin(m: edgetok.Model, ids: list[int]) -> float:
    """The gap between the two highest logits after `ids`."""
    backend = m.engine.backend
    top = np.sort(backend.forward(ids, backend.new_cache())[-1])
    return float(top[-1] - top[-2])


# -- greedy exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("speculate, width", [("lookup", 1), ("recycle", 1), ("recycle", 3)])
def test_greedy_tokens_equal_plain_decoding(kind, speculate, width, capsys, monkeypatch):
    """On every prompt set, speculative greedy tokens are plain greedy's, except after a near-tie
    (the reference's top-2 margin below ε at the first difference), which is counted and reported.
    Each prompt runs twice with speculation: Token Recycling's table, kept by the engine, then
    knows the answer (a random model's drafts are otherwise seldom accepted: nothing is verified).
    Width 3: trees of the top-3 candidates where the backend and cache verify trees, chains elsewhere."""
    name, m = kind
    _greedy_equals_plain(m, name, EPSILON[name], speculate, width, capsys, monkeypatch)


def test_greedy_trees_on_sliding_windows_equal_plain_decoding(gemma, capsys, monkeypatch):
    """Tiny Gemma 3 (windows of 8 tokens, prompts longer): recycle trees give plain greedy's tokens."""
    name = f"gemma {gemma.engine.backend.name}"
    _greedy_equals_plain(gemma, name, 1e-3, "recycle", 3, capsys, monkeypatch)


def _greedy_equals_plain(m: edgetok.Model, name: str, eps: float, speculate: str, width: int, capsys, monkeypatch) -> None:
    """... and where trees are verified (width > 1, a backend and cache that take them), some drafts
    were trees (forward_tree ran), not chains only."""
    backend, trees = m.engine.backend, []
    if TREE in backend.capabilities:
        verify = backend.forward_tree
        monkeypatch.setattr(backend, "forward_tree", lambda tree, cache: trees.append(tree) or verify(tree, cache))
    runs = differ = accepted = 0
    for set_name, prompts in PROMPT_SETS.items():
        for prompt in prompts:
            options = dict(max_new_tokens=40, ignore_eos=True)
            plain = generate(m, prompt, **options)
            for _ in range(2):
                spec = generate(m, prompt, speculate=speculate, draft_max=6, draft_width=width, lookup_ngram_min=1, **options)
                runs += 1
                accepted += spec.stats.accepted
                assert spec.stats.drafted >= spec.stats.accepted
                if spec.tokens == plain.tokens:
                    continue
                i = next(j for j, (a, b) in enumerate(zip(plain.tokens, spec.tokens)) if a != b)
                margin = top2_margin(m, m.encode(prompt, not isinstance(prompt, str)) + plain.tokens[:i])
                assert margin < eps, f"{set_name}: token {i} differs, but the reference's top-2 margin is {margin}"
                differ += 1
    assert accepted > 0, "no draft was ever accepted: the test shows nothing"
    takes_trees = TREE in backend.capabilities and m.engine._cache.takes_trees
    assert bool(trees) == (takes_trees and width > 1 and speculate == "recycle"), (name, len(trees))
    with capsys.disabled():
        print(f"\n[{name}, {speculate}, width {width}] greedy: {runs - differ}/{runs} generations equal plain decoding's, "
              f"{differ} differ after a near-tie (ε = {eps}); {len(trees)} draft trees verified")


# -- oracle and random drafts ------------------------------------------------------------------------
@dataclass
class Scripted:
    """A drafter that knows the plain continuation: proposes it (oracle) or tokens that are not it."""

    truth: list[int]  # the plain greedy continuation
    wrong: bool = False
    vocab: int = 0
    known: int = 0  # generated tokens so far
    last: int = -1  # the sequence's last token (a tree's root)

    def start(self, prompt: list[int]) -> None:
        self.known, self.last = 0, prompt[-1]

    def extend(self, tokens: list[int]) -> None:
        self.known += len(tokens)
        self.last = tokens[-1] if tokens else self.last

    def propose(self, k: int) -> list[int]:
        nxt = self.truth[self.known : self.known + k]
        if not self.wrong:
            return nxt
        g = torch.Generator().manual_seed(self.known)
        return [int((t + torch.randint(1, self.vocab, (), generator=g)) % self.vocab) for t in nxt]  # ≠ the truth

    def propose_tree(self, k: int, width: int, floor: float) -> DraftTree:
        """The proposal as a tree's branch, each of its tokens after a wrong sibling (width ≥ 2): an
        oracle's branch is then not the tree's first nodes."""
        right = self.propose(k // 2)
        tokens, parents, parent = [self.last], [-1], 0
        for depth, (token, true) in enumerate(zip(right, self.truth[self.known :])):
            sibling = (token + 1 + depth) % self.vocab  # (≠ token: vocab > depth + 2)
            sibling = (sibling + 1) % self.vocab if sibling == true else sibling  # never the truth
            tokens += [sibling, token]
            parents += [parent, parent]
            parent = len(tokens) - 1
        return DraftTree(tuple(tokens), tuple(parents))

    def learn(self, inputs: list[int], rows: np.ndarray) -> None:
        pass


def probe(m: edgetok.Model, tokens: list[int]) -> np.ndarray:
    """The logits of `tokens` run after what the engine's cache holds now (T, V)."""
    return m.engine.backend.forward(tokens, m.engine._cache, last=len(tokens))


def test_an_oracle_draft_is_accepted_whole(kind):
    name, m = kind
    prompt = PROMPT_SETS["input-grounded"][0]
    plain = generate(m, prompt, max_new_tokens=30, ignore_eos=True)
    spec = generate(m, prompt, Scripted(plain.tokens), max_new_tokens=30, ignore_eos=True, draft_max=8)
    assert spec.tokens == plain.tokens
    assert spec.stats.accepted == spec.stats.drafted > 0
    # whole drafts pass: their length doubles from the backend's min_draft up to 8 (with min_draft
    # 1: drafts of 1, 2, 4, 8, 8 and a plain step; 3: drafts of 3, 6, 8, 8), bounded by what is left
    steps, made, length = 0, 1, min(m.engine.backend.min_draft, 8)
    while made < 30:
        made, steps, length = made + min(length, 30 - made - 1) + 1, steps + 1, min(8, 2 * length)
    assert spec.stats.decode_steps == steps


def test_an_oracle_branch_of_a_tree_is_accepted_whole(kind):
    """Drafted as trees, the true continuation is one branch, each of its tokens beside a wrong one:
    the true branch is accepted to its end, the tokens are plain decoding's, and the cache then holds
    what plain decoding's holds (backends and caches that verify no trees draft chains instead)."""
    name, m = kind
    prompt, more = PROMPT_SETS["input-grounded"][0], m.encode(" over the lazy dog", chat=False)
    plain = generate(m, prompt, max_new_tokens=30, ignore_eos=True)
    want = probe(m, more)
    oracle = Scripted(plain.tokens, vocab=m.config.vocab_size)
    spec = generate(m, prompt, oracle, max_new_tokens=30, ignore_eos=True, draft_max=8, draft_width=2)
    assert spec.tokens == plain.tokens
    trees = TREE in m.engine.backend.capabilities and m.engine._cache.takes_trees
    assert trees == (name in ("torch", "default")), name  # (the fp32 export has ONNX Runtime's attention)
    if trees:  # half of every tree is the wrong siblings
        assert spec.stats.accepted > 0 and spec.stats.drafted == 2 * spec.stats.accepted
    else:
        assert spec.stats.accepted == spec.stats.drafted > 0
    got = probe(m, more)
    np.testing.assert_allclose(got, want, atol=1e-4 if name in EXACT_LOGITS else 0.05)


def test_a_trees_nodes_get_their_branches_logits_and_the_kept_branch_is_the_chain(kind):
    """forward_tree: each node's logits are those of its branch run as a chain after the same prompt;
    after keep_branch the cache is the chain's (the next token's logits agree)."""
    name, m = kind
    _check_tree_against_chains(m, atol=1e-4 if name in EXACT_LOGITS else 0.05)


def test_a_served_engine_verifies_trees_through_the_scheduler(kind):
    """`edgetok serve`'s engines drive a ScheduledBackend (every call a job on the scheduler's thread):
    an oracle tree's true branch is accepted there as on the backend itself, and the tokens are plain
    decoding's."""
    from edgetok.runtimes.engine import Engine
    from edgetok.serve.scheduler import ScheduledBackend, Scheduler

    name, m = kind
    prompt = PROMPT_SETS["input-grounded"][0]
    plain = generate(m, prompt, max_new_tokens=30, ignore_eos=True)
    scheduler = Scheduler(m.engine.backend)
    try:
        engine = Engine(ScheduledBackend(scheduler), m.tokenizer)
        *_, spec = engine.generate_ids(m.encode(prompt, False), GenerationConfig(max_new_tokens=30, ignore_eos=True, draft_max=8,
                                                                                 draft_width=2),
                                       drafter=Scripted(plain.tokens, vocab=m.config.vocab_size))
    finally:
        scheduler.close()
    assert spec.tokens == plain.tokens
    if TREE in m.engine.backend.capabilities and name in ("torch", "default"):  # half of every tree: wrong siblings
        assert spec.stats.accepted > 0 and spec.stats.drafted == 2 * spec.stats.accepted
    else:
        assert spec.stats.accepted == spec.stats.drafted > 0


@pytest.fixture(scope="module", params=["torch", "default"])
def gemma(request, tiny_gemma_folder) -> edgetok.Model:
    """Tiny Gemma 3 (sliding windows of 8 tokens) on the torch backend and the default engine."""
    return edgetok.load(str(tiny_gemma_folder), **({"backend": "torch"} if request.param == "torch" else {}))


def test_a_trees_nodes_see_their_sliding_windows_from_their_own_positions(gemma):
    """Gemma 3's sliding layers: a node's window counts back from its own position (root + depth), so
    its logits are still its branch's as a chain; the prompt is longer than the window."""
    assert TREE in gemma.engine.backend.capabilities
    _check_tree_against_chains(gemma, atol=1e-4 if gemma.engine.backend.name == "torch" else 0.05)


def _check_tree_against_chains(m: edgetok.Model, atol: float) -> None:
    backend = m.engine.backend
    prompt = m.encode(PROMPT_SETS["code"][1], chat=False)

    def prefilled():
        cache = backend.new_cache()
        backend.forward(prompt, cache)
        backend.end_prefill(cache)
        return cache

    cache = prefilled()
    if TREE not in backend.capabilities or not cache.takes_trees:
        pytest.skip(f"{backend.name} drafts chains here")
    tree = DraftTree((11, 12, 13, 14, 15, 16, 17, 12), (-1, 0, 0, 1, 1, 3, 2, 6))  # (a token twice, on two branches)
    rows = backend.forward_tree(tree, cache)
    for node in (3, 4, 5, 7):
        branch = tree.branch(node)
        chain = backend.forward([tree.tokens[i] for i in branch], prefilled(), last=len(branch))
        np.testing.assert_allclose(rows[branch], chain, atol=atol)
        assert (rows[branch].argmax(-1) == chain.argmax(-1)).all()
    branch = tree.branch(7)  # 11 → 13 → 17 → 12
    backend.keep_branch(cache, tree, branch)
    assert cache.length == len(prompt) + len(branch)
    chain = prefilled()
    backend.forward([tree.tokens[i] for i in branch], chain, last=len(branch))
    np.testing.assert_allclose(backend.forward([20, 21], cache, last=2), backend.forward([20, 21], chain, last=2), atol=atol)


def test_keep_branch_moves_every_layers_slots_in_a_compacted_cache():
    """A graph's cache whose sliding layer has dropped the tokens its window no longer sees (slot 0 is
    not position 0 there): keep_branch moves each layer's tree slots by that layer's own offset."""
    rng = np.random.default_rng(0)
    cache = ContiguousCache(2, 1, 4, windows=[None, 4], compact_every=8, slack=4)
    for _ in range(100):  # one token at a time, as decode appends; view() compacts the sliding layer (past 4 − 1 + 64 + 8)
        for layer in range(2):
            cache.view(layer, reserve=1)
            kv = rng.standard_normal((2, 1, 1, 1, 4)).astype(np.float32)
            cache.append(layer, None, kv[0], kv[1])
    assert cache.starts[1] > 0 and cache.starts[0] == 0
    start = cache.length
    tree = rng.standard_normal((2, 2, 1, 1, 5, 4)).astype(np.float32)  # per layer, K and V of five nodes
    for layer in range(2):
        cache.append(layer, None, tree[layer, 0], tree[layer, 1])
    cache.keep_branch(start, [0, 2, 4])
    assert cache.length == start + 3
    for layer in range(2):
        slot = start - cache.starts[layer]
        assert cache.lengths[layer] == slot + 3
        np.testing.assert_array_equal(cache.k[layer][:, :, slot : slot + 3], tree[layer, 0][:, :, [0, 2, 4]])
        np.testing.assert_array_equal(cache.v[layer][:, :, slot : slot + 3], tree[layer, 1][:, :, [0, 2, 4]])


@pytest.mark.parametrize("width", [1, 2])
def test_random_drafts_are_rejected_and_change_nothing(kind, width):
    """Every draft is wrong (chains, or trees where they are verified): nothing is accepted, the
    tokens are plain decoding's, and the cache then holds what plain decoding's holds (the next
    tokens' logits agree)."""
    name, m = kind
    prompt = PROMPT_SETS["code"][0]
    more = m.encode(" return a * b", chat=False)
    plain = generate(m, prompt, max_new_tokens=30, ignore_eos=True)
    want = probe(m, more)
    ids = list(m.engine._cached_ids)
    wrong = Scripted(plain.tokens, wrong=True, vocab=m.config.vocab_size)
    spec = generate(m, prompt, wrong, max_new_tokens=30, ignore_eos=True, draft_max=4, draft_width=width)
    assert spec.stats.drafted > 0 and spec.stats.accepted == 0
    assert spec.tokens == plain.tokens
    assert m.engine._cached_ids == ids
    # (llama.cpp quantizes its K/V; the default engine's head takes int8 activations outside its
    # exact top-16, whose rounding steps turn the ~1e-6 differences of K/V computed several tokens
    # at a time into ~1e-2: its next tokens, the rescored top, agree)
    got = probe(m, more)
    np.testing.assert_allclose(got, want, atol=1e-4 if name in EXACT_LOGITS else 0.05)
    assert (got.argmax(-1) == want.argmax(-1)).all()


# -- rollback in every cache (random tensors, no model) -------------------------------------------
L, HQ, HKV, D = 2, 4, 2, 16
PROMPT, PIECE = 160, 50
BUDGET = dict(budget="30%", sink_tokens=4, recent_tokens=8)  # most chunks are chosen by the last query
CACHES = {
    "contiguous": None,
    "tiered-ram": dict(budget="100%"),
    "tiered-ram-budget": BUDGET,
    "tiered-tiers": dict(budget="100%", device_mb=0.004, host_mb=0.008),
    "tiered-tiers-budget": dict(BUDGET, bits="8", device_mb=0.004, host_mb=0.008),
}


@pytest.fixture(params=list(CACHES))
def new_cache(request, tmp_path):
    made = []

    def new() -> KVCache:
        kv = CACHES[request.param]
        if kv is None:
            made.append(ContiguousCache(L, HKV, D))
        else:
            disk = dict(disk_dir=tmp_path) if "host_mb" in kv else {}
            made.append(TieredCache(KVConfig(chunk_sizes=(8, 16), **kv, **disk), L, HQ, HKV, D))
        return made[-1]

    yield new
    for cache in made:
        if isinstance(cache, TieredCache):
            cache.close()


@pytest.fixture(scope="module")
def seq():
    """q (L, Hq, N, D), k and v (L, Hkv, N, D): a sequence's per-layer tensors."""
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(L, h, 240, D, generator=g) for h in (HQ, HKV, HKV))


def attend(cache, seq, tokens: list[int]) -> list[torch.Tensor]:
    """The positions `tokens` (indices into seq) as the next tokens, through attend → per layer output."""
    q, k, v = (x[:, :, tokens] for x in seq)
    return [cache.attend(i, q[i, None], k[i, None], v[i, None]) for i in range(L)]


def graph(cache, seq, tokens: list[int], in_place: bool) -> list[list]:
    """The same through views (as the onnxruntime backend: numpy arrays) → per layer the view's token rows."""
    q, k, v = (x[:, :, tokens].numpy() for x in seq)
    t, rows = len(tokens), []
    for i in range(L):
        view_k, view_v, p = cache.view(i, reserve=t)
        rows.append(kv_rows(view_k[0, :, :p], view_v[0, :, :p]))
        r = min(t, cache.queries_read)
        queries = q[i, None, :, t - r :] if r else None
        if in_place and view_k.shape[2] >= p + t:
            view_k[0, :, p : p + t], view_v[0, :, p : p + t] = k[i], v[i]
            cache.advance(i, queries, t)
        else:
            cache.append(i, queries, k[i, None], v[i, None])
    return rows


@pytest.mark.parametrize("drive", ["attend", "graph-advance", "graph-append"])
def test_a_rolled_back_draft_leaves_no_trace(new_cache, seq, drive):
    """Decode, run a draft of 20 tokens, keep its first (truncate), decode on: every later step
    sees what a cache that only ever decoded the kept tokens sees. The drafts are longer than a
    chunk (8 or 16 tokens): the cache must not have sealed what it rolls back."""
    def run(cache, tokens):
        if drive == "attend":
            return attend(cache, seq, tokens)
        return graph(cache, seq, tokens, in_place=drive == "graph-advance")

    spec, plain = new_cache(), new_cache()
    for cache in (spec, plain):
        for a in range(0, PROMPT, PIECE):
            run(cache, list(range(a, min(a + PIECE, PROMPT))))
        cache.end_prefill()
    pos, junk = PROMPT, 220  # junk: positions of tokens that are never kept
    for step in range(12):
        run(spec, [pos] + list(range(junk, junk + 19)))  # the draft's first token is kept
        assert spec.truncate(pos + 1) == pos + 1
        run(plain, [pos])
        pos += 1
        for _ in range(step % 3):  # plain steps between the drafts
            assert all(_equal(a, b) for a, b in zip(run(spec, [pos]), run(plain, [pos]), strict=True))
            pos += 1
    assert spec.length == plain.length == pos


def _equal(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


# -- the accept rule keeps the sampling distribution ------------------------------------------------
def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test of counts against expected counts (categories expecting < 5 pooled) → p-value."""
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def test_the_accept_rule_draws_from_the_sampling_distribution():
    """sample(draft=d) for a likely, an unlikely and a filtered-out draft: the tokens it returns are
    distributed as plain sampling's (repetition penalty, temperature, top-k, top-p applied alike)."""
    logits = new_generator(0).standard_normal(60).astype(np.float32) * 2
    seen = np.zeros(60, dtype=bool)
    seen[:10] = True
    p = SamplingParams(temperature=0.8, top_k=30, top_p=0.95, repetition_penalty=1.3)
    probs = torch.from_numpy(softmax(filter_logits(apply_repetition_penalty(logits, seen, p.repetition_penalty), p)))
    order = probs.argsort(descending=True)
    n = 20000
    likely, unlikely, out = int(order[0]), int(order[8]), int(order[-1])  # (out is filtered out: p = 0)
    for drafts in ([likely], [unlikely], [out], [unlikely, likely], [out, unlikely, likely]):  # one, or a tree's siblings
        gen = new_generator(drafts[0])
        counts = torch.bincount(torch.tensor([sample(logits, p, seen, gen, drafts=drafts) for _ in range(n)]), minlength=60)
        assert chi_square_p(counts.double(), probs.double() * n) > 1e-3, drafts
        assert counts[probs == 0].sum() == 0


@pytest.mark.parametrize("width", [1, 2])
def test_speculative_sampling_keeps_the_joint_distribution(tiny, width):
    """Three tokens sampled with a draft verified after the first (accepted or replaced, the third
    then drawn from the bonus row with the draft counted as seen) are distributed as the model's
    own joint distribution, computed exactly. Width 2: four tokens, the draft after the first a tree
    of two nodes, the true token beside a sibling tried first (the multi-draft rule over a node's
    children)."""
    p = dict(temperature=1.0, top_k=3, repetition_penalty=1.5)
    new = 3 if width == 1 else 4
    prompt = tiny.tokenizer.encode("The quick brown fox")
    greedy = generate(tiny, "The quick brown fox", max_new_tokens=new, ignore_eos=True).tokens
    params = SamplingParams(**p)
    vocab, backend = tiny.config.vocab_size, tiny.engine.backend

    def step_probs(ids: list[int]) -> torch.Tensor:
        seen = np.zeros(vocab, dtype=bool)
        seen[ids] = True
        logits = backend.forward(ids, backend.new_cache())[-1].copy()
        return torch.from_numpy(softmax(filter_logits(apply_repetition_penalty(logits, seen, params.repetition_penalty), params))).double()

    joint: dict[tuple, float] = {}

    def fill(tokens: tuple, chance: float) -> None:
        if len(tokens) == new:
            joint[tokens] = chance
            return
        probs = step_probs(prompt + list(tokens))
        for t in probs.nonzero().flatten().tolist():
            fill((*tokens, t), chance * float(probs[t]))

    fill((), 1.0)
    cells = {key: i for i, key in enumerate(joint)}
    counts = torch.zeros(len(cells), dtype=torch.float64)
    n = 1500
    drafted = accepted = 0
    for seed in range(n):
        draft = Scripted(greedy, vocab=vocab)
        r = generate(tiny, "The quick brown fox", draft, max_new_tokens=new, ignore_eos=True, seed=seed, draft_width=width, **p)
        counts[cells[tuple(r.tokens)]] += 1
        drafted, accepted = drafted + r.stats.drafted, accepted + r.stats.accepted
    assert drafted > 0 and 0 < accepted < drafted  # both of the rule's branches ran
    expected = torch.tensor(list(joint.values()), dtype=torch.float64) * n
    assert chi_square_p(counts, expected) > 1e-3


# -- the drafters and the draft length ---------------------------------------------------------------
def test_prompt_lookup_proposes_what_followed_the_longest_recent_match():
    tokens = [8, 2, 3, 5, 1, 2, 3, 4, 9, 2, 3, 7, 8, 2, 3]
    d = PromptLookup(1, 3)
    d.start(tokens)
    assert d.propose(3) == [5, 1, 2]  # "8 2 3": the longest match wins over later shorter ones
    d = PromptLookup(1, 2)
    d.start(tokens)
    assert d.propose(3) == [7, 8, 2]  # "2 3": its latest occurrence
    d.extend([7])
    assert d.propose(2) == [8, 2]
    d = PromptLookup(1, 3)
    d.start([5, 6])
    assert d.propose(4) == []  # nothing repeats
    d.extend([5])
    assert d.propose(4) == [6, 5]  # a 1-gram match running into the suffix itself


def test_token_recycling_follows_the_models_first_candidates():
    d = TokenRecycling(10)
    d.start([1, 2, 3])  # the prompt seeds 1 → 2 → 3
    assert d.propose(4) == []  # nothing after 3 yet
    rows = np.zeros((2, 10), np.float32)
    rows[0, 4], rows[1, 1] = 1, 1  # the model said 4 after 3, and 1 after 4
    d.learn([3, 4], rows)
    assert d.propose(5) == [4, 1, 2, 3, 4]
    d.start([1, 7])  # a new prompt seeds only what the model has not said: 1 → 2 stays
    assert d.propose(3) == [] and d.next[1, 0] == 2
    d.extend([1])
    assert d.propose(2) == [2, 3]


def test_token_recycling_grows_its_tree_where_candidates_hold():
    """A table of top-2 candidates: the tree's nodes go to the likeliest paths by how often each rank
    turned out to be the model's next choice — a chain of first candidates while they hold, branches
    at the root once second candidates hold more often — and none to a path less likely than the floor."""
    d = TokenRecycling(10, width=2)
    d.start([1, 2])
    tokens = list(range(10))
    firsts, seconds = np.zeros((10, 10), np.float32), np.zeros((10, 10), np.float32)
    for t in tokens:  # after t the model ranks t + 1 first and t + 5 second, or the other way round
        firsts[t, (t + 1) % 10], firsts[t, (t + 5) % 10] = 2, 1
        seconds[t, (t + 5) % 10], seconds[t, (t + 1) % 10] = 2, 1
    for _ in range(20):
        d.learn(tokens, firsts)
    d.extend([1])
    tree = d.propose_tree(4, 2, 0.0)
    assert tree.tokens == (1, 2, 3, 4, 5) and tree.is_chain  # first candidates hold: 1 → 2 → 3 → 4 → 5
    for _ in range(10):  # each time, the model's choice is the table's second candidate
        d.learn(tokens, seconds)
        d.learn(tokens, firsts)
    tree = d.propose_tree(4, 2, 0.0)
    assert len(tree.tokens) == 5 and not tree.is_chain
    assert {tree.tokens[c] for c in tree.children(0)} == {2, 6}  # both of the root's candidates
    # the rates now ≈ 0.49 (first) and 0.51 (second): at a floor of 0.3 the root's two candidates only
    tree = d.propose_tree(4, 2, 0.3)
    assert tree.drafted == 2 and tree.children(0) == [1, 2]


def test_a_draft_tree_knows_its_shape():
    tree = DraftTree((5, 6, 7, 8, 9), (-1, 0, 0, 1, 3))  # 5 → {6 → 8 → 9, 7}
    assert tree.depths.tolist() == [0, 1, 1, 2, 3] and tree.drafted == 4 and not tree.is_chain
    assert tree.children(0) == [1, 2] and tree.branch(4) == [0, 1, 3, 4]
    assert tree.visible.astype(int).tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0],
                                                 [1, 1, 0, 1, 1]]
    assert DraftTree.chain(5, [6, 7]).is_chain
    for tokens, parents in [((5, 6), (-1, 1)), ((5, 6, 6), (-1, 0, 0)), ((5,), (0,)), (tuple(range(17)), tuple(range(-1, 16)))]:
        with pytest.raises(ValueError):
            DraftTree(tokens, parents)


def test_draft_length_adapts_and_pauses_after_misses():
    MIN_DRAFT = 3  # a backend whose forwards of 2-4 tokens cost about the same
    c = DraftControl(13, MIN_DRAFT)
    lengths = []
    for _ in range(4):
        lengths.append(c.next_length())
        c.update(lengths[-1], lengths[-1])
    assert lengths == [MIN_DRAFT, 2 * MIN_DRAFT, 4 * MIN_DRAFT, 13]  # doubled while whole drafts pass, up to draft_max
    c.update(13, 5)
    assert c.next_length() == 6  # just past what passed
    c.update(6, 0)
    assert c.next_length() == MIN_DRAFT  # never shorter: a few more drafted tokens cost little
    for _ in range(MISSES_BEFORE_PAUSE - 1):
        c.update(c.next_length(), 1)  # one accepted token does not pay for a forward that costs ~2 steps
    assert [c.next_length() for _ in range(PAUSE_MIN)] == [0] * PAUSE_MIN
    assert c.next_length() == MIN_DRAFT
    c.update(MIN_DRAFT, 0)  # backing off: one more miss pauses again, twice as long
    assert [c.next_length() for _ in range(2 * PAUSE_MIN)] == [0] * (2 * PAUSE_MIN)
    c.update(c.next_length(), 2)
    assert c.pause == PAUSE_MIN and not c.backing_off  # a round that pays resets the back-off
    assert DraftControl(2, MIN_DRAFT).next_length() == 2  # draft_max bounds it

    cheap = DraftControl(8)  # a backend whose verifying forward costs about a step: one token pays
    assert cheap.next_length() == 1
    cheap.update(1, 1)
    cheap.update(2, 1)
    assert cheap.misses == 0 and cheap.next_length() == 2


def test_drafts_that_always_miss_are_probed_rarely():
    """Text the drafter never guesses (open chat for lookup) pays for one probe per PAUSE_MAX steps
    once the pauses have grown: a probe that misses costs a fifth of a step on the default engine."""
    c, probes = DraftControl(8), []
    for step in range(2000):
        if k := c.next_length():
            probes.append(step)
            c.update(k, 0)
    assert len(probes) <= 2000 / PAUSE_MAX + 10  # (the first misses, before the pauses have grown)
    assert all(b - a - 1 == PAUSE_MAX for a, b in zip(probes[10:], probes[11:]))  # steps between probes


# -- configuration and the command line ----------------------------------------------------------
@pytest.mark.parametrize("options, flag", [
    (dict(speculate="medusa"), "--speculate"),
    (dict(speculate="lookup", draft_max=0), "--draft-max"),
    (dict(speculate="recycle", draft_width=0), "--draft-width"),
    (dict(speculate="lookup", lookup_ngram_min=3, lookup_ngram_max=2), "--lookup-ngram-min"),
])
def test_bad_settings_are_one_sentence(options, flag):
    with pytest.raises(EdgetokError, match=flag):
        GenerationConfig(**options)


def test_run_json_reports_the_drafts(tiny_folder):
    r = run_cli("run", tiny_folder, "-p", "def add(a, b):\n    return a + b\n\ndef add(a, b):\n", "--no-chat",
                "-n", "24", "--speculate", "lookup", "--draft-max", "4", "--lookup-ngram-min", "1", "--json")
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)["stats"]
    assert stats["drafted"] >= stats["accepted"] >= 0 and stats["verify_rounds"] > 0 and stats["verify_s"] > 0
    assert stats["mean_accepted_length"] == round(stats["accepted"] / stats["verify_rounds"], 3)


# -- the real model ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_lookup_is_greedy_exact_and_accepts_quotes(smollm2):
    """SmolLM2 (torch, fp32) asked to repeat a paragraph: lookup drafts are accepted in long runs,
    and the tokens are plain decoding's (or differ after a near-tie)."""
    from edgetok.texts import essays

    paragraph = essays(2000)[:1200]
    messages = [{"role": "user", "content": f"Repeat the following text word for word.\n\n{paragraph}"}]
    plain = generate(smollm2, messages, max_new_tokens=96)
    spec = generate(smollm2, messages, speculate="lookup", max_new_tokens=96)
    assert spec.stats.decode_steps < 0.6 * spec.stats.generated_tokens  # (measured: 35 forwards for 96 tokens)
    if spec.tokens != plain.tokens:
        i = next(j for j, (a, b) in enumerate(zip(plain.tokens, spec.tokens)) if a != b)
        assert top2_margin(smollm2, smollm2.encode(messages, True) + plain.tokens[:i]) < EPSILON["torch"]


@pytest.mark.slow
def test_smollm2_default_engine_is_greedy_exact_on_three_prompt_sets(capsys):
    """SmolLM2 on the default engine (its Q4_1 codes at 4 bits, float activations: a one-token step and a
    verification of several tokens run different kernels, which round differently): speculative
    greedy tokens are plain decoding's on input-grounded, code and chat prompts, or part from them
    after a near-tie (top-2 margin < ε at the first difference), which is reported with its count."""
    from pathlib import Path

    from edgetok.texts import essays

    m = edgetok.load("smollm2")
    assert m.choice.weights.startswith("the GGUF's own codes (Q4_1 → int4"), m.choice  # its default export
    essay = essays(4000)
    code = (Path(edgetok.__file__).parent / "runtimes" / "sampling.py").read_text()[:2000]
    sets = {
        "input-grounded": [f"Repeat the following text word for word.\n\n{essay[:1200]}",
                           f"{essay[1200:3200]}\n\nSummarize the text above, quoting its key sentences."],
        "code": [f"{code}\n\nRewrite the function `filter_logits` above with its argument `p` renamed to `params`.",
                 "Write a Python function that returns the n-th Fibonacci number, with a docstring and a test."],
        "chat": ["Write a short story about a lighthouse keeper who finds a strange bottle on the beach.",
                 "Explain to a ten-year-old how a rainbow forms."],
    }
    eps, runs, near_ties, accepted = 0.01, 0, [], 0
    for set_name, prompts in sets.items():
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            plain = generate(m, messages, max_new_tokens=64)
            for speculate, width in (("lookup", 1), ("recycle", 1), ("recycle", 2)):  # (width 2: trees)
                spec = generate(m, messages, speculate=speculate, draft_width=width, max_new_tokens=64)
                runs, accepted = runs + 1, accepted + spec.stats.accepted
                if spec.tokens == plain.tokens:
                    continue
                i = next((j for j, (a, b) in enumerate(zip(plain.tokens, spec.tokens)) if a != b), None)
                assert i is not None, f"{set_name}: one output is a prefix of the other: an EOS moved"
                margin = top2_margin(m, m.encode(messages, True) + plain.tokens[:i])
                assert margin < eps, f"{set_name}, {speculate} w{width}: token {i} differs at a top-2 margin of {margin:.4f}"
                near_ties.append((set_name, speculate, width, i, round(margin, 5)))
    assert accepted > 0
    with capsys.disabled():
        print(f"\n[smollm2, default engine] greedy: {runs - len(near_ties)}/{runs} generations equal plain "
              f"decoding's; {len(near_ties)} part after a near-tie (ε = {eps}): {near_ties}")
