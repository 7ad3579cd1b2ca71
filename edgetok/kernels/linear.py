"""Weight-only int8 linear layers: one int8 row per output and a bf16 scale, bf16 activations.

At batch 1 a decoder's matmuls are bound by the bytes of their weights; int8 halves them against
bf16 and quarters them against fp32. `torch._weight_int8pack_mm` is ATen's CPU kernel for this
(it wants bf16 activations: with fp32 ones it is slower than a plain fp32 linear).
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float → int8 codes (out, in) and per-row scales (out,): w ≈ codes * scale."""
    scale = w.float().abs().amax(1).clamp_min(1e-8) / 127
    codes = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return codes, scale


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        codes, scale = quantize_rows(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))

    @classmethod
    def concat(cls, parts: list[Int8Linear]) -> Int8Linear:
        """One layer whose outputs are all of `parts`' outputs, in order (exact: scales are per row)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.register_buffer("codes", torch.cat([p.codes for p in parts]))
        fused.register_buffer("scale", torch.cat([p.scale for p in parts]))
        biases = [p.bias if p.bias is not None else p.scale.new_zeros(p.codes.shape[0]) for p in parts]
        fused.register_buffer("bias", None if all(p.bias is None for p in parts) else torch.cat(biases))
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.codes, self.scale).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def int8_linears(module: nn.Module) -> None:
    """Replace every nn.Linear below `module` by an Int8Linear of its weights (tied ones included)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child.weight.data, None if child.bias is None else child.bias.data))
        else:
            int8_linears(child)
