"""Prompt pruning on a model with sliding-window layers (a tiny random Gemma 3): after a pruned
prefill the kept tokens keep their positions, with gaps, and a sliding layer's window counts
positions, not stored tokens, in the exact cache and in the budgeted one's windows (MixedCache)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model
from test_prune import CHUNK, PROMPT, N, pruned, unpruned

from edgetok.kernels.attention import attend
from edgetok.models.config import ModelConfig
from edgetok.models.sources import Source
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.kv import ContiguousCache, KVConfig, MixedCache
from edgetok.runtimes.kv.window import WindowLayer
from edgetok.runtimes.prune import PrunePlan

WINDOW = 16  # far shorter than the gaps a 0.3 keep leaves in a 300-token prompt
AFTER = 1  # layers 0, 2 slide, 1, 3 attend fully: a sliding and a full layer after the prune layer


@pytest.fixture(scope="module")
def source():
    hf = make_hf_model("gemma3", vocab_size=300, seed=5, layers=4, max_positions=1024, sliding_window=WINDOW,
                       sliding_window_pattern=2, query_pre_attn_scalar=16)
    weights = hf.state_dict()
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    assert cfg.windows == [WINDOW, None, WINDOW, None]
    return Source("tiny-gemma4", None, "hf", cfg, None, lambda: weights)


@pytest.fixture(scope="module")
def exact(source):
    return TorchBackend(source)


@pytest.fixture(scope="module")
def windowed(source):
    """The budgeted cache at a full budget: sliding layers in WindowLayers, full ones tiered, exact."""
    backend = TorchBackend(source, kv=KVConfig(budget="100%", chunk_sizes=(8, 16)))
    assert isinstance(backend.new_cache(), MixedCache)
    return backend


def plan(source, keep: float) -> PrunePlan:
    return PrunePlan.checked(keep, AFTER, source.config)


def test_window_layer_masks_by_position():
    """Kept tokens at positions with gaps, then decode: a query sees the keys fewer than `window`
    positions back, however few of them are stored."""
    g = torch.Generator().manual_seed(0)
    layer = WindowLayer(4, 1, 8, torch.float32, slack=0)
    kept = torch.tensor([0, 1, 5, 8, 9])
    k, v = torch.randn(1, 1, 6, 8, generator=g), torch.randn(1, 1, 6, 8, generator=g)
    q = torch.randn(1, 2, 6, 8, generator=g)
    layer.skip(5, kept)  # a 10-token prompt, 5 kept
    got = layer.attend(q[:, :, :5], k[:, :, :5], v[:, :, :5])
    got_next = layer.attend(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:])  # decode: position 10
    assert layer.end == 11 and layer.pos[: layer.n].tolist()[-3:] == [8, 9, 10]
    positions = [0, 1, 5, 8, 9, 10]
    for i, p in enumerate(positions):
        seen = [j for j, kp in enumerate(positions) if p - 4 < kp <= p]  # e.g. position 8 sees 5 and 8
        want = attend(q[:, :, i : i + 1], k[:, :, seen], v[:, :, seen], None)
        row = got[:, :, i : i + 1] if i < 5 else got_next
        assert torch.allclose(row, want, atol=1e-6), p
    assert layer.truncate(10) and layer.n == 5 and layer.end == 10  # a rolled-back decode token
    layer.reset()
    assert layer.n == 0 and not layer.gaps


def test_keep_all_is_exact(exact, windowed, source):
    want, want_logits, _ = unpruned(exact, 12)
    for backend in (exact, windowed):
        got, logits, cache, kept = pruned(backend, plan(source, 1.0), 12)
        assert kept.tolist() == list(range(N))
        assert got == want
        assert (logits - want_logits).abs().max() < 1e-4


class _Masked:
    """The later layers' attention over one piece of kept tokens with explicit masks (layer → (K, K)
    bool): what a pruned prefill computes there, written without a cache."""

    def __init__(self, masks: dict[int, torch.Tensor]) -> None:
        self.masks = masks

    def attend(self, layer: int, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.masks[layer], enable_gqa=True)


def later_layers_by_hand(backend, source, kept: torch.Tensor, window_of) -> torch.Tensor:
    """The pruned prompt's last logits: layers ≤ AFTER on every token, the later ones on the kept
    tokens with each layer's mask from window_of(layer) over the kept positions (or slots)."""
    model, c = backend.model, source.config
    with torch.inference_mode():
        x = model.embed(torch.tensor([PROMPT]))
        ref = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, windows=c.windows)
        x = model.run_layers(x, model.rope(torch.arange(N), x.dtype), ref, 0, AFTER + 1)[:, kept]
        masks = {i: window_of(i) for i in range(AFTER + 1, c.num_layers)}
        x = model.run_layers(x, model.rope(kept, x.dtype), _Masked(masks), AFTER + 1)
        return model.head(x[0, -1])


def test_pruned_prefill_windows_count_positions(exact, windowed, source):
    """keep < 1: the later sliding layer masks by the kept tokens' positions (a reference written
    with explicit masks), in both caches, and decoding after it agrees between them."""
    p = plan(source, 0.3)
    got, logits, cache, kept = pruned(exact, p, 16)
    assert len(kept) < N and cache.lengths == [N + 15, N + 15, len(kept) + 15, len(kept) + 15]
    assert int((kept[1:] - kept[:-1]).max()) >= WINDOW  # gaps the window must not count as one slot

    def by_position(layer):
        d = kept[:, None] - kept[None, :]  # query position − key position
        w = source.config.windows[layer]
        return (d >= 0) & (d < w) if w is not None else d >= 0

    def by_slot(layer):  # the mistake: a window of stored tokens
        s = torch.arange(len(kept))
        d = s[:, None] - s[None, :]
        w = source.config.windows[layer]
        return (d >= 0) & (d < w) if w is not None else d >= 0

    want = later_layers_by_hand(exact, source, kept, by_position)
    assert (logits[0] - want).abs().max() < 1e-4
    assert (logits[0] - later_layers_by_hand(exact, source, kept, by_slot)).abs().max() > 1e-2  # the check sees it

    got_w, logits_w, cache_w, kept_w = pruned(windowed, p, 16)
    assert torch.equal(kept_w, kept)
    assert got_w == got
    assert (logits_w - logits).abs().max() < 1e-4
    sliding = cache_w.sliding[2]
    assert sliding.n <= sliding.k.shape[2] and sliding.end == N + 15
    cache_w.close()


def test_budgeted_cache_after_a_pruned_prompt_decodes(source):
    """A 50 % budget over the full layers, windows for the sliding ones, after a pruned prompt."""
    backend = TorchBackend(source, kv=KVConfig(budget="50%", chunk_sizes=(8, 16)))
    got, logits, cache, kept = pruned(backend, plan(source, 0.5), 12)
    assert len(got) == 12 and torch.isfinite(logits).all()
    assert cache.length == N + 11
    cache.close()


def test_rollback_after_a_pruned_prompt_keeps_the_windows(exact, windowed, source):
    """A rejected draft after a pruned prompt: truncating the decode's last tokens and running them
    again gives the same logits, in both caches."""
    p = plan(source, 0.3)
    for backend in (exact, windowed):
        cache = backend.new_cache()
        out = backend.prefill_pruned(PROMPT, cache, p, CHUNK)
        backend.end_prefill(cache)
        first = backend.forward([5, 6, 7], cache)
        assert backend.truncate(cache, N + 1) == N + 1
        again = backend.forward([6, 7], cache)
        assert abs(first[-2:] - again).max() < 1e-4
        assert out.logits.shape == (300,)
        if backend is windowed:
            cache.close()
