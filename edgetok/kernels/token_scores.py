"""Chunk selection from every token's estimated score (after SparQ Attention), not the chunks' bounds.

A chunk's bound (kernels/selection.py) adds, channel by channel, the largest product the chunk's
keys could give: with 64 channels and 16 tokens it is far above any token's real score, and the
ranking it gives misses much of what a head attends to. On legal text at 4K with a 25 % budget the
bound ranking left a mean KL of 0.086 where an oracle that ranks the same chunks by the exact
attention left 0.008 (JSON / CSV: 0.127 against 0.0007; BENCHMARKS.md, "Token scores").

So each KV head estimates every token's logit from the R channels where its query group is
largest (Σ_g |q_g,d|): q_R·k_R, divided by √(D · ‖q_R‖₁ / ‖q‖₁) rather than √D (SparQ's
correction: the channels left out would have spread the scores), and a softmax over all tokens
gives each chunk's share of each query head's attention, and the window's.

The chunks' keys are read from a sketch (Double Sparsity's "label cache", all channels kept):
int8, channel-major — each KV head's channel a row over the tokens, one scale per (head,
channel) — so the R channels' rows are R/D of the keys at a quarter of their bytes (bf16): at 8K
the cache's scoring read 3 MB per layer from the keys, 0.6 MB from the sketch. It costs a quarter
of the keys' bf16 bytes (an eighth of the K/V) beside them. The window (the unsealed tail) is read
from the keys themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# R. At 4K and a 25 % budget (legal / JSON-CSV / dialogue) the KL was 0.009 / 0.0011 / 0.011 with the
# 24 largest channels (bf16 keys), 0.018 / 0.0021 / 0.013 with 16 (alike with int8 keys), against 0.0078 /
# 0.0007 / 0.0068 ranking by the exact attention and 0.086 / 0.127 / 0.071 by bounds (BENCHMARKS.md, "Token scores").
CHANNELS = 24
SKETCH_LEVELS = 127  # int8 codes in [-127, 127]: code = round(key / scale), scale = the channel's |max| / 127


def sketch_scale(keys: torch.Tensor) -> torch.Tensor:
    """keys (Hkv, N, D) → (Hkv, D) float32: each channel's step, from the largest |key| it has
    (keys stored later are clamped to it: an outlier's estimate saturates, its own chunk's rank
    with it, and nothing else moves)."""
    return (keys.float().abs().amax(1) / SKETCH_LEVELS).clamp(min=1e-8)


def sketch_codes(keys: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """keys (Hkv, N, D), scale (Hkv, D) → int8 codes (Hkv, D, N): channel-major."""
    codes = (keys.float() / scale[:, None]).round().clamp(-SKETCH_LEVELS, SKETCH_LEVELS)
    return codes.to(torch.int8).transpose(1, 2)


class KeySketch:
    """One layer's key sketch: codes (Hkv, D, capacity) int8, channel-major, of which the first n
    tokens are written (the layer's sealed chunks, in order), and the scale (Hkv, D) fixed by the
    first keys added (the prompt's)."""

    def __init__(self) -> None:
        self.codes = torch.zeros(0, 0, 0, dtype=torch.int8)
        self.scale: torch.Tensor | None = None
        self.n = 0

    def add(self, keys: torch.Tensor) -> None:
        """keys (Hkv, M, D): the next M tokens' keys (a sealed chunk, or the prompt's chunks)."""
        if keys.shape[1] == 0:  # (a prompt shorter than a chunk: the first sealed chunk sets the scale)
            return
        if self.scale is None:
            self.scale = sketch_scale(keys)
        hkv, m, d = keys.shape
        need = self.n + m
        if need > self.codes.shape[2]:  # room for a quarter more (a chunk at a time would copy every step)
            grown = torch.zeros(hkv, d, max(need + 64, need * 5 // 4), dtype=torch.int8)
            if self.n:
                grown[:, :, : self.n] = self.codes[:, :, : self.n]
            self.codes = grown
        self.codes[:, :, self.n : need] = sketch_codes(keys, self.scale)
        self.n = need

    def keys(self, window: torch.Tensor) -> torch.Tensor:
        """What the scores read (token_masses' keys): the sketch's keys, then the window's own keys
        (Hkv, W, D) → (Hkv, n + W, D) float32."""
        if self.scale is None:
            return window.float()
        return torch.cat([self.codes[:, :, : self.n].float().transpose(1, 2) * self.scale[:, None],
                          window.float()], 1)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + (0 if self.scale is None else self.scale.numel() * 4)


def token_masses(q: torch.Tensor, keys: torch.Tensor, chunks: int, chunk_size: int,
                 channels: int = CHANNELS) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, D) a step's queries; keys (Hkv, N, D) every key of the layer, the first chunks ×
    chunk_size in chunks, the rest the window → each query head's estimated attention mass per
    chunk (Hkv, G, C) and in the window (Hkv, G); G = Hq / Hkv."""
    hkv, n, d = keys.shape
    qg = q.reshape(hkv, -1, d).float()  # (Hkv, G, D)
    picked = top_channels(qg, channels)  # (Hkv, R)
    q_r = qg.gather(-1, picked[:, None].expand(-1, qg.shape[1], -1))  # (Hkv, G, R)
    k_r = keys.gather(-1, picked[:, None].expand(-1, n, -1)).float()  # (Hkv, N, R)
    kept = q_r.abs().sum(-1, keepdim=True) / qg.abs().sum(-1, keepdim=True).clamp(min=1e-30)  # (Hkv, G, 1)
    p = (q_r @ k_r.transpose(1, 2) / (d * kept.clamp(min=1e-6)).sqrt()).softmax(-1)  # (Hkv, G, N)
    cut = chunks * chunk_size
    return p[..., :cut].reshape(hkv, qg.shape[1], chunks, chunk_size).sum(-1), p[..., cut:].sum(-1)


def top_channels(qg: torch.Tensor, channels: int) -> torch.Tensor:
    """qg (Hkv, G, D) → (Hkv, R): the R channels where each group's Σ|q| is largest (ties: the lower)."""
    weight = qg.abs().sum(1)  # (Hkv, D)
    return torch.sort(weight, dim=-1, descending=True, stable=True).indices[:, : min(channels, qg.shape[-1])]


@dataclass
class Selected:
    chosen: list[torch.Tensor]  # per group (every KV head, or one for the layer): chunk ids, ascending
    estimated: float  # the least covered query head's estimated attention held by its group's chunks and the window


def select_by_masses(masses: torch.Tensor, window: torch.Tensor, forced: torch.Tensor, keep: int,
                     coverage: float | None, per_head: bool, least: int = 0) -> Selected:
    """One layer's chunks: masses (Hkv, G, C), window (Hkv, G) from token_masses; forced (C,)
    bool (sinks, recent, pinned: always read); keep the chunks each group reads at most (a fixed
    budget reads that many). With a coverage target (--kv-budget auto) each group reads, along its
    order, as many as its neediest query head needs for that share of its estimated attention
    (the window counts), from the forced ones (and `least`: auto's floor) up to keep. Groups: each KV head (per_head, ranked by
    the query head of its group that wants a chunk most), or one for the layer (ranked by the
    query head of any group that wants it most)."""
    hkv, g, c = masses.shape
    groups = hkv if per_head else 1
    if c == 0:  # no chunk yet: nothing to miss
        return Selected([torch.zeros(0, dtype=torch.long)] * groups, 1.0)
    m = masses.reshape(groups, hkv * g // groups, c)  # (groups, query heads in it, C)
    rank = m.amax(1).masked_fill(forced, float("inf"))  # (groups, C)
    order = rank.argsort(dim=-1, descending=True, stable=True)
    covered = window.reshape(groups, -1, 1) + m.gather(-1, order[:, None].expand_as(m)).cumsum(-1)  # (groups, heads, C)
    n = torch.full((groups,), keep)
    if coverage is not None:
        need = ((covered < coverage).sum(-1) + 1).clamp(max=c).amax(-1)  # (groups,)
        n = need.clamp(min=max(int(forced.sum()), least), max=keep)
    n = n.clamp(min=1, max=c)
    estimated = covered.gather(-1, (n - 1)[:, None, None].expand(-1, m.shape[1], 1)).amin().item()
    return Selected([order[i, : int(n[i])].sort().values for i in range(groups)], estimated)


def forced_chunks(count: int, sinks: int, recent: int, pinned: torch.Tensor) -> torch.Tensor:
    """(count,) bool: the first `sinks` chunks, the last `recent` and those `pinned` marks."""
    forced = pinned[:count].clone()
    forced[:sinks] = True
    forced[count - recent :] = True  # (recent 0: an empty slice)
    return forced

