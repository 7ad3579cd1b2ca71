"""Prefill with prompt pruning: the later layers run only on the prompt tokens that matter.

Layers 0..L run on the whole prompt (in chunks). The observation window (the last prompt
tokens, which hold the question) then scores every token by the attention it receives in layer
L; the sinks, the window and the best-scored tokens (a `keep` fraction in all) go on through
layers L+1.. at their original positions, so their K/V there is what it would be at those
positions. Pruned tokens keep their K/V in layers 0..L only. Decoding continues at the full
prompt length.

Sliding-window layers after L (Gemma 3) store the kept tokens too, and their window counts
positions, not stored tokens: the cache masks by the kept positions it is given (KVCache.skip).
Keeping those layers unpruned instead would run every token through them, and the pruned tokens'
residual stream would then need the full layers too: no saving left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgetok.errors import EdgetokError
from edgetok.models.config import ModelConfig

if TYPE_CHECKING:  # the plan is plain data (the engine imports it without torch); the prefill is torch's
    import torch

    from edgetok.models.llama import LlamaModel
    from edgetok.runtimes.kv import KVCache

DEFAULT_AFTER_LAYER = 2  # SmolLM2 (30 layers): see BENCHMARKS.md, "Prompt pruning"


def check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:  # (NaN fails too)
        raise EdgetokError(f"--prune-prompt is the fraction of prompt tokens kept, in (0, 1], not {keep}")


@dataclass
class PrunePlan:
    keep: float  # fraction of the prompt's tokens the layers after `after_layer` run on, in (0, 1]
    after_layer: int  # the last layer that sees every prompt token
    sinks: int = 4  # the first tokens, always kept (attention sinks)
    window: int = 32  # the last tokens: the observation window, always kept
    # A token scores the best of its ±pool/2 neighbours (keeps a fact's words together). 11 rather than
    # 7: over 42 needle prompts (7 kinds, 4K and 8K, 3 depths) it found every needle 7 found, and two
    # more; 15 and 21 lost others (BENCHMARKS.md, "Prompt pruning's pooling width").
    pool: int = 11
    # Tokens within ±radius of the densest matches of the window's rare words are kept whatever the
    # attention says, up to this share of the kept tokens (kernels/keep.referenced)
    radius: int = 24
    referenced_share: float = 0.125

    @staticmethod
    def checked(keep: float, after_layer: int | None, config: ModelConfig) -> PrunePlan:
        """The plan for this model, or one clear error about the flags."""
        check_keep(keep)
        num_layers = config.num_layers
        if num_layers < 2:
            raise EdgetokError("--prune-prompt needs a model with at least 2 layers")
        if after_layer is None:
            after_layer = min(DEFAULT_AFTER_LAYER, num_layers - 2)
        if not 0 <= after_layer <= num_layers - 2:
            raise EdgetokError(
                f"--prune-after-layer must be between 0 and {num_layers - 2} for this model "
                f"({num_layers} layers; at least one layer must come after it), not {after_layer}"
            )
        return PrunePlan(keep, after_layer)

    def forced(self, ids) -> np.ndarray:
        """ids (N,) the prompt's token ids → (N,) bool: the tokens kept whatever the attention says
        (besides the sinks and the window): what the window's rare words refer to."""
        from edgetok.kernels.keep import kept_count, referenced

        n = len(ids)
        w = min(self.window, n)
        quota = int((kept_count(n, self.keep, self.sinks, w) - self.sinks - w) * self.referenced_share)
        return referenced(ids, w, self.radius, quota)


@dataclass
class Pruned:
    logits: np.ndarray  # (V,) float32, the last prompt token's
    kept: np.ndarray  # (K,) int64 positions of the tokens layers > after_layer hold, in order


def prefill_pruned(
    model: LlamaModel,
    tokens: list[int],
    cache: KVCache,
    plan: PrunePlan,
    chunk: int,
    progress: Callable[[int], None] | None = None,
) -> Pruned:
    """Run `tokens` into an empty `cache`, pruning after layer plan.after_layer."""
    import torch

    with torch.inference_mode():
        return _prefill_pruned(model, tokens, cache, plan, chunk, progress)


def _prefill_pruned(model, tokens, cache, plan, chunk, progress) -> Pruned:
    import torch

    from edgetok.kernels.keep import kept_count

    assert cache.length == 0, "a pruned prefill starts from an empty cache"
    n, last = len(tokens), plan.after_layer
    n_layers = len(model.model.layers)
    ids = torch.tensor([tokens])
    n_kept = kept_count(n, plan.keep, plan.sinks, min(plan.window, n))
    report = _Progress(progress, n, n * (last + 1) + n_kept * (n_layers - last - 1))

    # Layers 0..L on every token. Keep layer L's input (to score) and output (to go on): at 8K
    # tokens and SmolLM2's width, 18 MB each.
    shape, dtype = (1, n, model.config.hidden_size), model.model.embed_tokens.weight.dtype
    layer_in, layer_out = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        x = model.embed(ids[:, start:stop])
        rope = model.rope(torch.arange(start, stop), x.dtype)
        x = model.run_layers(x, rope, cache, 0, last)
        layer_in[:, start:stop] = x
        layer_out[:, start:stop] = model.run_layers(x, rope, cache, last, last + 1)
        report.done(stop - start, last + 1)

    kept = _choose(model, layer_in, ids[0], plan, n_kept)
    del layer_in
    for layer in range(last + 1, n_layers):
        cache.skip(layer, n - len(kept), kept)

    # Layers L+1.. on the kept tokens only, at their own positions.
    x_kept = layer_out[:, kept]
    del layer_out
    for start in range(0, len(kept), chunk):
        positions = kept[start : start + chunk]
        x = x_kept[:, start : start + chunk]
        x = model.run_layers(x, model.rope(positions, x.dtype), cache, last + 1)
        report.done(len(positions), n_layers - last - 1)
    return Pruned(model.head(x[0, -1]).numpy(), kept.numpy())


def _choose(model: LlamaModel, layer_in: torch.Tensor, ids: torch.Tensor, plan: PrunePlan, count: int) -> torch.Tensor:
    """Score every token with the window's queries against all keys of layer L, and keep what the
    window's words refer to (ids (N,)) → kept positions (K,).

    Queries and keys are recomputed from layer L's input (a small matmul) rather than read from
    the cache, which may hold keys at another precision or in tiers on disk.
    """
    import torch

    from edgetok.kernels.pruning import select_kept, token_scores

    n = layer_in.shape[1]
    w = min(plan.window, n)
    block = model.model.layers[plan.after_layer]
    h = block.input_layernorm(layer_in)
    cos, sin = model.rope(torch.arange(n), h.dtype).of(plan.after_layer)
    q, _, _ = block.self_attn.project(h[:, -w:], cos[-w:], sin[-w:])  # (1, Hq, W, D)
    _, k, _ = block.self_attn.project(h, cos, sin)  # (1, Hkv, N, D)
    scores = token_scores(q[0], k[0], plan.pool)
    return select_kept(scores, count, plan.sinks, w, torch.from_numpy(plan.forced(ids.numpy())))


class _Progress:
    """Reports prompt tokens done in proportion to the layer passes done: the bar counts prompt
    tokens, and a pruned token costs fewer layers than a kept one."""

    def __init__(self, callback: Callable[[int], None] | None, n: int, total_passes: int) -> None:
        self.callback, self.n, self.total = callback, n, max(total_passes, 1)
        self.passes = self.reported = 0

    def done(self, tokens: int, layers: int) -> None:
        self.passes += tokens * layers
        target = round(self.n * self.passes / self.total)
        if self.callback is not None and target > self.reported:
            self.callback(target - self.reported)
            self.reported = target
