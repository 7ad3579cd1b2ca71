"""A chunk's stored form at a bit width: float32, bfloat16, or int8/4/2 (keys per channel, values per token)."""

from __future__ import annotations

from collections import defaultdict

import torch

from edgetok.kernels import mixed_attention
from edgetok.kernels.attention import attend, causal_mask
from edgetok.kernels.quant import QTensor, dequantize_stack, quantize

Tensors = dict[str, torch.Tensor]


def encode(k: torch.Tensor, v: torch.Tensor, bits: int) -> tuple[Tensors, tuple]:
    """k, v (Hkv, S, D) → (tensors to store, meta). Keys are quantized along their tokens (one scale
    per channel: channels differ in range), values along their channels (one scale per token)."""
    if bits == 32:
        return {"k": k.float().contiguous(), "v": v.float().contiguous()}, (32,)
    if bits == 16:  # bfloat16: what approximate attention computes in, so reading it back is free
        return {"k": k.to(torch.bfloat16).contiguous(), "v": v.to(torch.bfloat16).contiguous()}, (16,)
    s, d = k.shape[1], k.shape[2]
    kq = quantize(k.transpose(1, 2), bits, group=s)  # (Hkv, D, S): per-channel groups over tokens
    vq = quantize(v, bits, group=d if d <= 64 else 64)  # (Hkv, S, D): per-token groups over channels
    tensors = {"kc": kq.codes, "ks": kq.scale, "kz": kq.zero, "vc": vq.codes, "vs": vq.scale, "vz": vq.zero}
    return tensors, (bits, kq.group, kq.shape, vq.group, vq.shape)


def decode_many(
    items: list[tuple[Tensors, tuple]], dtype: torch.dtype = torch.float32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stored forms → (k, v) in `dtype`, batching chunks of the same form into one dequantization."""
    out: list = [None] * len(items)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (tensors, meta) in enumerate(items):
        shape = tuple(tensors["k"].shape) if meta[0] in (32, 16) else ()  # float chunks may differ in length
        groups[meta + shape].append(i)
    for idx in groups.values():
        meta = items[idx[0]][1]
        if meta[0] in (32, 16):  # one conversion for the whole group
            ks = torch.stack([items[i][0]["k"] for i in idx]).to(dtype)
            vs = torch.stack([items[i][0]["v"] for i in idx]).to(dtype)
            for j, i in enumerate(idx):
                out[i] = (ks[j], vs[j])
            continue
        bits, kgroup, kshape, vgroup, vshape = meta
        kq = [QTensor(items[i][0]["kc"], items[i][0]["ks"], items[i][0]["kz"], bits, kgroup, kshape) for i in idx]
        vq = [QTensor(items[i][0]["vc"], items[i][0]["vs"], items[i][0]["vz"], bits, vgroup, vshape) for i in idx]
        # back to (n, Hkv, S, D), channels contiguous (what attention and the kernel's float rows read)
        ks = dequantize_stack(kq).transpose(2, 3).to(dtype, memory_format=torch.contiguous_format)
        vs = dequantize_stack(vq).to(dtype)
        for j, i in enumerate(idx):
            out[i] = (ks[j], vs[j])
    return out


def kernel_row(tensors: Tensors, meta: tuple) -> list[int]:
    """The mixed-bit attention op's table row for a stored form (it points into `tensors`)."""
    if meta[0] in (32, 16):
        return mixed_attention.float_row(tensors["k"], tensors["v"])
    bits, _, kshape, _, _ = meta
    return mixed_attention.quantized_row(bits, kshape[-1], *(tensors[name] for name in ("kc", "ks", "kz", "vc", "vs", "vz")))


def attend_reference(q: torch.Tensor, forms: list[tuple[Tensors, tuple]], window_k: torch.Tensor, window_v: torch.Tensor) -> torch.Tensor:
    """The mixed-bit attention op's oracle, in plain torch: q (Hq, T, D) over the stored forms'
    chunks then the window (Hkv, W ≥ T, D), whose last T tokens are the queries' own (causal) →
    (Hq, T, D) float32. Dequantizes everything to float32 first: what the kernel must not do."""
    hkv, _, d = window_k.shape
    parts = decode_many(forms) + [(window_k.float(), window_v.float())]
    keys, values = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    return attend(q[None].float(), keys[None], values[None], causal_mask(q.shape[1], keys.shape[1]))[0]
