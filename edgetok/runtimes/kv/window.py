"""A sliding-window layer's cache: only the last tokens its window can still see.

A layer whose attention sees the last `window` positions (Gemma 3's local layers, Mistral) needs
no tiers and no selection: it keeps the last window − 1 tokens before the next forward, plus
`slack` more so that a rejected draft can be rolled back, in one buffer of the tokens in order.
The oldest tokens are dropped in one move once the buffer holds twice what it must keep
(amortized O(1) per token).

Each slot's position is kept beside it: after a pruned prefill the layer stores only the kept
prompt tokens, whose positions have gaps, and its window counts positions, not stored tokens
(keeping the last `keep` stored tokens still keeps every position the window can see). Without
gaps, masking by position is masking by slot.
"""

from __future__ import annotations

import numpy as np
import torch

from edgetok.kernels.attention import attend, causal_mask, position_mask

ROLLBACK_SLACK = 64  # tokens kept beyond the window: the longest rollback that keeps the layer exact


class WindowLayer:
    """One layer's K/V: the last `keep` (or more) tokens, in order, in a buffer (1, Hkv, capacity, D),
    and their positions (capacity,)."""

    def __init__(self, window: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 slack: int = ROLLBACK_SLACK) -> None:
        self.window = window
        self.keep = window - 1 + slack  # the fewest tokens kept after a drop
        self.shape = (1, num_kv_heads, 2 * self.keep, head_dim)
        self.k = torch.zeros(self.shape, dtype=dtype)
        self.v = torch.zeros(self.shape, dtype=dtype)
        self.pos = torch.zeros(2 * self.keep, dtype=torch.int64)
        self.n = 0  # tokens in the buffer (the last ones the layer stored)
        self.end = 0  # the position after the sequence's last token (skipped positions included)
        self.dropped = 0  # stored tokens dropped from the buffer (out of every window)
        self.lost = 0  # every position before this one that the layer stored was dropped
        self.gaps = False  # some positions were skipped (a pruned prompt): mask by position
        self.planned = torch.zeros(0, dtype=torch.int64)  # the positions of the next tokens stored, when skipped

    def nbytes(self) -> int:
        return 2 * self.k[:, :, : self.n].nbytes

    def _room(self, t: int) -> None:
        """Room for t more tokens: drop the oldest beyond `keep` (they are out of every window), or
        grow (one forward of more tokens than the buffer holds)."""
        if self.n + t <= self.k.shape[2]:
            return
        drop = max(0, self.n - self.keep)
        if drop:
            self.lost = int(self.pos[drop - 1]) + 1
        for buf in (self.k, self.v):
            buf[:, :, : self.n - drop] = buf[:, :, drop : self.n].clone()
        self.pos[: self.n - drop] = self.pos[drop : self.n].clone()
        self.n -= drop
        self.dropped += drop
        if self.n + t > self.k.shape[2]:
            size = self.n + t + self.keep
            self.k, self.v = (_grown(buf, self.n, size) for buf in (self.k, self.v))
            self.pos = _grown(self.pos[None, None, :, None], self.n, size)[0, 0, :, 0]

    def skip(self, n: int, kept: torch.Tensor) -> None:
        """n positions from `end` on are never stored; the next tokens stored are at `kept` (K,)."""
        self.planned = torch.as_tensor(kept, dtype=torch.int64)  # (a graph's backend hands numpy)
        self.end += n
        self.gaps = True

    def _place(self, t: int) -> None:
        """The positions of t tokens just stored in slots n..n+t−1: the planned ones first."""
        take = min(t, len(self.planned))
        self.pos[self.n : self.n + take] = self.planned[:take]
        self.planned = self.planned[take:]
        self.end += take  # (skip counted the positions between them)
        self.pos[self.n + take : self.n + t] = torch.arange(self.end, self.end + t - take)
        self.end += t - take
        self.n += t

    def positions(self) -> torch.Tensor:
        """The positions (n,) of the tokens held, in slot order."""
        return self.pos[: self.n]

    def view(self, reserve: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The buffers with room for `reserve` more tokens after the n held."""
        self._room(reserve)
        return self.k, self.v, self.n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (1, Hkv, T, D): the next T tokens (already in place after view() if a graph wrote them)."""
        t = k.shape[2]
        self._room(t)
        for buf, new in ((self.k, k), (self.v, v)):
            dst = buf[:, :, self.n : self.n + t]
            if dst.data_ptr() != new.data_ptr():
                dst.copy_(new)
        self._place(t)

    def advance(self, t: int) -> None:
        """A graph wrote t tokens after the n held (into view()'s buffers)."""
        assert self.n + t <= self.k.shape[2]
        self._place(t)

    def table_row(self) -> np.ndarray:
        """The mixed-bit op's row (1, fields) for what the step's tokens see besides themselves: the
        last window − 1 tokens held, sliding (a draft's later tokens see fewer of them; a graph's
        decode step from tables; no gaps)."""
        from edgetok.kernels.mixed_attention import float_row

        lo = max(0, self.n - (self.window - 1))
        return np.array([float_row(self.k[0, :, lo : self.n], self.v[0, :, lo : self.n], slides=self.window)], np.int64)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (1, Hkv, T, D); q (1, Hq, T, D) over the window of each → (1, Hq, T, D)."""
        self.append(k, v)
        t = k.shape[2]
        if self.gaps:  # a pruned prompt's kept tokens: the window counts positions
            pos = self.positions()
            mask = position_mask(pos[self.n - t :], pos, self.window)
        else:
            mask = causal_mask(t, self.n, self.window, device=q.device)
        return attend(q.to(self.k.dtype), self.k[:, :, : self.n], self.v[:, :, : self.n], mask).to(q.dtype)

    def truncate(self, n: int) -> bool:
        """Forget positions n.. ; False when the layer no longer holds what position n's window needs."""
        if n < self.end and len(self.planned):
            return False  # a pruned prompt half run: start over
        if n == 0:
            self.reset()
            return True
        held = int((self.pos[: self.n] < n).sum())
        if self.lost > max(0, n - self.window + 1):
            return False  # a position that position n's window sees was dropped
        self.n = held
        self.end = n
        return True

    def held(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A prompt's state: the tokens held, k, v (Hkv, M, D), and the position of the first."""
        assert not self.gaps, "a pruned prompt's K/V is not a prefix anyone can reuse"
        start = self.end - self.n
        return self.k[0, :, : self.n], self.v[0, :, : self.n], start

    def load(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Take a stored window, k, v (Hkv, M, D) at positions start.., into this empty layer."""
        assert self.n == 0 and self.end == 0
        self.append(k[None].to(self.k.dtype), v[None].to(self.v.dtype))
        self.pos[: self.n] += start
        self.end += start
        self.lost = self.dropped = start  # (positions before start: out of the window, dropped)

    def reset(self) -> None:
        self.n = self.end = self.dropped = self.lost = 0
        self.gaps = False
        self.planned = torch.zeros(0, dtype=torch.int64)


def _grown(buf: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """buf (1, H, C, D) with room for `size` tokens along dim 2, its first n kept."""
    new = buf.new_zeros(buf.shape[:2] + (size,) + buf.shape[3:])
    new[:, :, :n] = buf[:, :, :n]
    return new
