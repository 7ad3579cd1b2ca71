"""Weight quantization for the exporters: group-wise integer weights, W ≈ (q - zero) · scale.

A linear layer's weight W (N out, K in) is cut along K into groups of `group_size` inputs; each
(row, group) has one scale and one integer zero point. Every artifact writer (ONNX MatMulNBits,
ONNX QDQ, GGUF blocks) consumes a `QuantizedWeight`, whichever method chose its codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # (N, K) uint8 codes in [0, 2^bits)
    scale: torch.Tensor  # (N, K // group_size) float32
    zero: torch.Tensor  # (N, K // group_size) uint8; symmetric weights have zero = 2^(bits-1)
    bits: int
    group_size: int  # == K: one scale per output channel

    def __post_init__(self) -> None:
        n, k = self.q.shape
        assert k % self.group_size == 0, (k, self.group_size)
        assert self.scale.shape == self.zero.shape == (n, k // self.group_size), (self.scale.shape, self.zero.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32."""
        n, k = self.q.shape
        g = self.q.view(n, k // self.group_size, self.group_size).float()
        w = (g - self.zero.float()[..., None]) * self.scale[..., None]
        return w.reshape(n, k)


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedWeight:
    """Round to nearest: per group, asymmetric min/max (or symmetric absmax) scaling. w: (N, K)."""
    assert bits in (2, 3, 4, 8), bits
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {k}")
    g = w.float().reshape(n, k // group_size, group_size)
    levels = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        # ±absmax spans all 2^bits levels (as GPTQ does): codes -mid..mid-1 around zero = mid
        scale = (2 * g.abs().amax(-1) / levels).clamp_min(1e-12)
        zero = torch.full_like(scale, mid, dtype=torch.uint8)
    else:
        lo, hi = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)  # keep 0 representable
        scale = ((hi - lo) / levels).clamp_min(1e-12)
        zero = (-lo / scale).round().clamp(0, levels).to(torch.uint8)
    q = (g / scale[..., None] + zero.float()[..., None]).round().clamp(0, levels).to(torch.uint8)
    return QuantizedWeight(q.reshape(n, k), scale.float(), zero, bits, group_size)
