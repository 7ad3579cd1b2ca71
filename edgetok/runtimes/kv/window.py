"""A sliding-window layer's cache: only the last tokens its window can still see.

A layer whose attention sees the last `window` positions (Gemma 3's local layers, Mistral) needs
no tiers and no selection: it keeps the last window − 1 tokens before the next forward, plus
`slack` more so that a rejected draft can be rolled back, in one buffer whose slots are
consecutive positions. The oldest tokens are dropped in one move once the buffer holds twice what
it must keep (amortized O(1) per token). Attention masks by slot, which is by position here.
"""

from __future__ import annotations

import torch

from edgetok.kernels.attention import attend, causal_mask

ROLLBACK_SLACK = 64  # tokens kept beyond the window: the longest rollback that keeps the layer exact


class WindowLayer:
    """One layer's K/V: the last `keep` (or more) tokens, in order, in a buffer (1, Hkv, capacity, D)."""

    def __init__(self, window: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 slack: int = ROLLBACK_SLACK) -> None:
        self.window = window
        self.keep = window - 1 + slack  # the fewest tokens kept after a drop
        self.shape = (1, num_kv_heads, 2 * self.keep, head_dim)
        self.k = torch.zeros(self.shape, dtype=dtype)
        self.v = torch.zeros(self.shape, dtype=dtype)
        self.n = 0  # tokens in the buffer (the last ones of the sequence)
        self.seen = 0  # tokens the sequence has had: positions 0..seen-1, the last n of them here

    @property
    def dropped(self) -> int:
        """The oldest positions no longer held."""
        return self.seen - self.n

    def nbytes(self) -> int:
        return 2 * self.k[:, :, : self.n].nbytes

    def _room(self, t: int) -> None:
        """Room for t more tokens: drop the oldest beyond `keep` (they are out of every window), or
        grow (one forward of more tokens than the buffer holds)."""
        if self.n + t <= self.k.shape[2]:
            return
        drop = max(0, self.n - self.keep)
        for buf in (self.k, self.v):
            buf[:, :, : self.n - drop] = buf[:, :, drop : self.n].clone()
        self.n -= drop
        if self.n + t > self.k.shape[2]:
            size = self.n + t + self.keep
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_zeros(old.shape[:2] + (size,) + old.shape[3:])
                new[:, :, : self.n] = old[:, :, : self.n]
                setattr(self, name, new)

    def view(self, reserve: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The buffers with room for `reserve` more tokens after the n held."""
        self._room(reserve)
        return self.k, self.v, self.n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (1, Hkv, T, D): the next T positions (already in place after view() if a graph wrote them)."""
        t = k.shape[2]
        self._room(t)
        for buf, new in ((self.k, k), (self.v, v)):
            dst = buf[:, :, self.n : self.n + t]
            if dst.data_ptr() != new.data_ptr():
                dst.copy_(new)
        self.n += t
        self.seen += t

    def advance(self, t: int) -> None:
        """A graph wrote t tokens after the n held (into view()'s buffers)."""
        assert self.n + t <= self.k.shape[2]
        self.n += t
        self.seen += t

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (1, Hkv, T, D); q (1, Hq, T, D) over the window of each → (1, Hq, T, D)."""
        self.append(k, v)
        mask = causal_mask(k.shape[2], self.n, self.window, device=q.device)
        return attend(q.to(self.k.dtype), self.k[:, :, : self.n], self.v[:, :, : self.n], mask).to(q.dtype)

    def truncate(self, n: int) -> bool:
        """Forget positions n.. ; False when the layer no longer holds what position n's window needs."""
        drop = self.seen - n
        if drop > self.n or (n > 0 and self.n - drop < min(n, self.window - 1)):
            return False
        self.n -= drop
        self.seen = n
        return True

    def reset(self) -> None:
        self.n = self.seen = 0
