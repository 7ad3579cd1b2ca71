"""Group-wise asymmetric quantization of K/V chunks: int8 / int4 / int2, packed into bytes.

x is quantized along its last axis in groups of `group` values: per group, zero = min and
scale = (max - min) / (2^bits - 1), both fp16; codes are packed low bits first (two int4 or four
int2 per byte). Keys are quantized per channel (the caller puts tokens on the last axis), values
per token (channels on the last axis), as KIVI found best.

`dequantize_reference` is the plain version; `dequantize_stack` does many chunks in one pass —
the one the cache calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)


@dataclass
class QTensor:
    codes: torch.Tensor  # uint8 (..., n_values * bits / 8)
    scale: torch.Tensor  # fp16 (..., n_groups)
    zero: torch.Tensor  # fp16 (..., n_groups)
    bits: int
    group: int
    shape: tuple[int, ...]  # of the float tensor

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes


def quantize(x: torch.Tensor, bits: int, group: int) -> QTensor:
    assert bits in SUPPORTED_BITS, bits
    n = x.shape[-1]
    assert n % group == 0 and (group * bits) % 8 == 0, (n, group, bits)
    g = x.float().reshape(*x.shape[:-1], n // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8).half()
    zero = lo.half()
    q = ((g - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    q = q.reshape(*x.shape[:-1], n)
    per_byte = 8 // bits
    if per_byte > 1:
        q = q.reshape(*x.shape[:-1], n // per_byte, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        q = (q << shifts).sum(-1, dtype=torch.uint8)
    return QTensor(q.contiguous(), scale.squeeze(-1), zero.squeeze(-1), bits, group, tuple(x.shape))


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (..., nbytes) → codes (..., nbytes * 8 // bits), low bits first."""
    if bits == 8:
        return codes
    mask = (1 << bits) - 1
    # One op per code position: faster on CPU than a broadcast shift over a new axis.
    return torch.stack([(codes >> shift) & mask for shift in range(0, 8, bits)], -1).flatten(-2)


def dequantize(q: QTensor) -> torch.Tensor:
    codes = _unpack(q.codes, q.bits).float()
    g = codes.reshape(*q.shape[:-1], q.shape[-1] // q.group, q.group)
    return (g * q.scale.float()[..., None] + q.zero.float()[..., None]).reshape(q.shape)


def dequantize_stack(qs: list[QTensor]) -> torch.Tensor:
    """Dequantize same-shaped QTensors in one pass → (len(qs), *shape).

    Equal to stacking dequantize(q) for each q, with a few large ops in place of many small
    ones: on a CPU the per-op overhead, not arithmetic, is what a chunk-at-a-time loop pays.
    """
    first = qs[0]
    assert all(q.bits == first.bits and q.shape == first.shape and q.group == first.group for q in qs)
    codes = torch.stack([q.codes for q in qs])
    scale = torch.stack([q.scale for q in qs]).float()
    zero = torch.stack([q.zero for q in qs]).float()
    values = _unpack(codes, first.bits).float()
    g = values.view(len(qs), *first.shape[:-1], first.shape[-1] // first.group, first.group)
    return torch.addcmul(zero[..., None], g, scale[..., None]).view(len(qs), *first.shape)
