"""A family's checkpoint layout ↔ edgetok's weights (one tensor per linear, HF-named).

Phi-3's checkpoints hold q/k/v as one `self_attn.qkv_proj` and gate/up as one `mlp.gate_up_proj`,
their rows stacked in names.FUSED's order. edgetok splits them on load, so every family runs,
quantizes and exports through the same linears, and stacks them again where a format wants them
stacked (an HF folder of Phi-3; llama.cpp's phi3 ffn_up).
"""

from __future__ import annotations

import torch

from edgetok.models.config import ModelConfig
from edgetok.models.names import FUSED, GATE_UP_FUSED, QKV_FUSED, fused_parts

FUSED_FAMILIES = ("phi3",)  # whose HF checkpoints stack their linears


def part_rows(cfg: ModelConfig, fused: str) -> list[int]:
    """The rows of each part stacked in a fused linear (QKV_FUSED or GATE_UP_FUSED), in order."""
    if fused == QKV_FUSED:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [q, kv, kv]
    assert fused == GATE_UP_FUSED, fused
    return [cfg.intermediate_size] * 2


def split_fused(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Fused tensors ("...qkv_proj.weight") replaced by their parts (views, no copy)."""
    out = {}
    for name, w in weights.items():
        parts = fused_parts(name)
        if parts is None:
            out[name] = w
            continue
        fused = next(f for f in FUSED if f".{f}." in name)
        out |= dict(zip(parts, w.split(part_rows(cfg, fused))))
    return out


def stack(weights: dict[str, torch.Tensor], fused_name: str) -> torch.Tensor:
    """The fused tensor `fused_name` ("model.layers.3.mlp.gate_up_proj.weight") from its parts."""
    return torch.cat([weights[p] for p in fused_parts(fused_name)])


def fuse(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint layout of cfg's family: its parts stacked again where the family fuses them."""
    if cfg.arch not in FUSED_FAMILIES:
        return dict(weights)
    out, taken = {}, set()
    for name in weights:
        for fused, parts in FUSED.items():
            for part in parts:
                if f".{part}." in name:
                    fused_name = name.replace(part, fused)
                    if fused_name not in out:
                        out[fused_name] = stack(weights, fused_name)
                    taken.add(name)
    return out | {k: v for k, v in weights.items() if k not in taken}
