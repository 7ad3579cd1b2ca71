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

The chunks' keys are read from a sketch (after Double Sparsity's "label cache", every channel
kept): 4-bit codes per (KV head, channel) range (KIVI's per-channel keys), channel-major — each
channel's codes a row over the tokens — so the R channels' rows are R/D of the keys at a quarter
of their bytes (bf16): at 8K and R = 24 the scoring reads 0.3 MB per layer from the sketch where
it read 3.1 MB from the keys. It costs an eighth of the K/V's bf16 bytes beside them. The window
(the unsealed tail) is read from the keys themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# R. At 4K and a 25 % budget (legal / JSON-CSV / dialogue) the KL was 0.009 / 0.0011 / 0.011 with the
# 24 largest channels (bf16 keys), 0.018 / 0.0021 / 0.013 with 16 (alike with int8 keys), against 0.0078 /
# 0.0007 / 0.0068 ranking by the exact attention and 0.086 / 0.127 / 0.071 by bounds (BENCHMARKS.md, "Token scores").
CHANNELS = 24
SKETCH_LEVELS = 15  # 4-bit codes: key ≈ low + code · step, per (KV head, channel), KIVI's per-channel keys


def channels_for(head_dim: int) -> int:
    """R for heads of head_dim channels: 24 at 64 (above); a wider head, half its channels. Gemma 3's
    256-channel global layers at 8K and a fixed 25 % left a KL of 0.0148 / 0.0101 / 0.0067 on legal text
    with 24 / 96 / 128 channels (BENCHMARKS.md, "Gemma 3 at 16K and 32K"): 24 of 256 rank poorly."""
    return CHANNELS if head_dim <= 64 else head_dim // 2


def sketch_range(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys (Hkv, N, D) → low, step (Hkv, D) float32: each channel's smallest key and the step that
    spans its largest (keys stored later are clamped to the range: an outlier's estimate saturates,
    its own chunk's rank with it, and nothing else moves). Per channel because key channels sit at
    offsets of their own: a shared zero would spend most of the 16 levels on no key."""
    low, high = keys.float().amin(1), keys.float().amax(1)
    return low, ((high - low) / SKETCH_LEVELS).clamp(min=1e-8)


def sketch_codes(keys: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """keys (Hkv, N, D) → uint8 codes in [0, 15] (Hkv, D, N): channel-major."""
    codes = ((keys.float() - low[:, None]) / step[:, None]).round().clamp(0, SKETCH_LEVELS)
    return codes.to(torch.uint8).transpose(1, 2)


class KeySketch:
    """One layer's key sketch: per KV head and channel, its tokens' 4-bit codes in a row (packed
    two tokens a byte, token 2j in byte j's low half: (Hkv, D, capacity bytes) uint8), of which the
    first n tokens are written (the layer's sealed chunks, in order); low and step (Hkv, D) fixed
    by the first keys added (the prompt's)."""

    def __init__(self) -> None:
        self.packed = torch.zeros(0, 0, 0, dtype=torch.uint8)
        self.low: torch.Tensor | None = None
        self.step: torch.Tensor | None = None
        self.n = 0

    def add(self, keys: torch.Tensor) -> None:
        """keys (Hkv, M, D): the next M tokens' keys (a sealed chunk, or the prompt's chunks)."""
        if keys.shape[1] == 0:  # (a prompt shorter than a chunk: the first sealed chunk sets the range)
            return
        if self.low is None:
            self.low, self.step = sketch_range(keys)
        hkv, m, d = keys.shape
        codes = sketch_codes(keys, self.low, self.step)  # (Hkv, D, M)
        start = self.n - self.n % 2  # an odd n shares its last byte with the first new token
        if self.n % 2:  # (its code is that byte's low half: no need to unpack the rest)
            codes = torch.cat([self.packed[:, :, start // 2 : start // 2 + 1] & 15, codes], 2)
        if codes.shape[2] % 2:
            codes = torch.cat([codes, torch.zeros_like(codes[:, :, :1])], 2)
        need = (self.n + m + 1) // 2
        if need > self.packed.shape[2]:  # room for a quarter more (a chunk at a time would copy every step)
            grown = torch.zeros(hkv, d, max(need + 32, need * 5 // 4), dtype=torch.uint8)
            if self.n:
                grown[:, :, : (self.n + 1) // 2] = self.packed[:, :, : (self.n + 1) // 2]
            self.packed = grown
        self.packed[:, :, start // 2 : need] = codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)
        self.n += m

    def codes(self) -> torch.Tensor:
        """(Hkv, D, n) uint8: the written tokens' codes, unpacked."""
        both = self.packed[:, :, : (self.n + 1) // 2]
        return torch.stack([both & 15, both >> 4], -1).flatten(2)[:, :, : self.n]

    def keys(self, window: torch.Tensor) -> torch.Tensor:
        """What the scores read (token_masses' keys): the sketch's keys, then the window's own keys
        (Hkv, W, D) → (Hkv, n + W, D) float32."""
        if self.low is None:
            return window.float()
        sketched = self.low[:, None] + self.codes().float().transpose(1, 2) * self.step[:, None]
        return torch.cat([sketched, window.float()], 1)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + (0 if self.low is None else 2 * self.low.numel() * 4)


def token_masses(q: torch.Tensor, keys: torch.Tensor, chunks: int, chunk_size: int,
                 channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, D) a step's queries; keys (Hkv, N, D) every key of the layer, the first chunks ×
    chunk_size in chunks, the rest the window → each query head's estimated attention mass per
    chunk (Hkv, G, C) and in the window (Hkv, G); G = Hq / Hkv. channels: R (None: channels_for(D))."""
    hkv, n, d = keys.shape
    qg = q.reshape(hkv, -1, d).float()  # (Hkv, G, D)
    picked = top_channels(qg, channels_for(d) if channels is None else channels)  # (Hkv, R)
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

