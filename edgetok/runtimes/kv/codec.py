"""A chunk's stored form at a bit width: float32, bfloat16, or int8/4/2 (keys per channel, values per token).

A form is its tensors packed into one byte buffer (Packed) and a meta tuple: a home holds one
buffer, the disk file stores and reads it back whole, and the mixed-bit kernel's table row is
addresses into it — made without building a tensor (a step reads tens of chunks from disk; making
six tensors of each, then freeing them, cost more than reading it).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from edgetok.kernels import mixed_attention
from edgetok.kernels.attention import attend, causal_mask
from edgetok.kernels.quant import QTensor, dequantize_stack, quantize

ALIGN = 64  # bytes: each tensor of a packed form starts on a cache line (and any dtype's alignment)


@dataclass(frozen=True, eq=False)
class Layout:
    """Where each tensor of a packed form lies: (name, dtype, shape, byte offset) in order; one
    object per kind of chunk (layout_of), shared by every chunk of that kind."""

    parts: tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]
    offsets: dict[str, int]
    size: int  # bytes


@functools.cache
def layout_of(parts: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]) -> Layout:
    placed, at = [], 0
    for name, dtype, shape in parts:
        placed.append((name, dtype, shape, at))
        at += -(-torch.Size(shape).numel() * dtype.itemsize // ALIGN) * ALIGN
    return Layout(tuple(placed), {name: offset for name, _, _, offset in placed}, at)


class Packed(Mapping):
    """A chunk's tensors in one contiguous uint8 buffer: tensors by name (views, made when first
    asked for), or just their addresses (pointer)."""

    __slots__ = ("buffer", "layout", "_views")

    def __init__(self, buffer: torch.Tensor, layout: Layout) -> None:
        self.buffer, self.layout, self._views = buffer, layout, None

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> Packed:
        layout = layout_of(tuple((name, t.dtype, tuple(t.shape)) for name, t in tensors.items()))
        packed = cls(torch.empty(layout.size, dtype=torch.uint8), layout)
        for name, t in tensors.items():
            packed[name].copy_(t)
        return packed

    def _make_views(self) -> dict[str, torch.Tensor]:
        if self._views is None:
            b = self.buffer
            self._views = {name: b[at : at + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)
                           for name, dtype, shape, at in self.layout.parts}
        return self._views

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._make_views()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.offsets)

    def __len__(self) -> int:
        return len(self.layout.parts)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def owned(self) -> Packed:
        """This form holding only its own bytes (a view into a larger buffer, such as a run of chunks
        read from disk at once, would keep all of it alive)."""
        if self.buffer.untyped_storage().nbytes() == self.buffer.numel():
            return self
        return Packed(self.buffer.clone(), self.layout)



def encode(k: torch.Tensor, v: torch.Tensor, bits: int) -> tuple[Packed, tuple]:
    """k, v (Hkv, S, D) → (tensors to store, meta). Keys are quantized along their tokens (one scale
    per channel: channels differ in range), values along their channels (one scale per token)."""
    if bits == 32:
        return Packed.of({"k": k.float(), "v": v.float()}), (32,)
    if bits == 16:  # bfloat16: what approximate attention computes in, so reading it back is free
        return Packed.of({"k": k.to(torch.bfloat16), "v": v.to(torch.bfloat16)}), (16,)
    s, d = k.shape[1], k.shape[2]
    kq = quantize(k.transpose(1, 2), bits, group=s)  # (Hkv, D, S): per-channel groups over tokens
    vq = quantize(v, bits, group=d if d <= 64 else 64)  # (Hkv, S, D): per-token groups over channels
    tensors = {"kc": kq.codes, "ks": kq.scale, "kz": kq.zero, "vc": vq.codes, "vs": vq.scale, "vz": vq.zero}
    return Packed.of(tensors), (bits, kq.group, kq.shape, vq.group, vq.shape)


def decode_many(
    items: list[tuple[Packed, tuple]], dtype: torch.dtype = torch.float32
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


def kernel_row(tensors: Packed, meta: tuple) -> list[int]:
    """The mixed-bit attention op's table row for a stored form (it points into `tensors`), made
    from addresses alone (mixed_attention.FIELDS; every packed tensor is contiguous)."""
    base, at = tensors.buffer.data_ptr(), tensors.layout.offsets
    if meta[0] in (32, 16):
        _, _, (_, s, d), _ = tensors.layout.parts[0]
        return mixed_attention.row(meta[0], s, base + at["k"], base + at["v"], head_stride=s * d, token_stride=d)
    bits, _, kshape, _, _ = meta
    return mixed_attention.row(bits, kshape[-1], *(base + at[name] for name in ("kc", "vc", "ks", "kz", "vs", "vz")))


def attend_reference(q: torch.Tensor, forms: list[tuple[Packed, tuple]], window_k: torch.Tensor, window_v: torch.Tensor) -> torch.Tensor:
    """The mixed-bit attention op's oracle, in plain torch: q (Hq, T, D) over the stored forms'
    chunks then the window (Hkv, W ≥ T, D), whose last T tokens are the queries' own (causal) →
    (Hq, T, D) float32. Dequantizes everything to float32 first: what the kernel must not do."""
    hkv, _, d = window_k.shape
    parts = decode_many(forms) + [(window_k.float(), window_v.float())]
    keys, values = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    return attend(q[None].float(), keys[None], values[None], causal_mask(q.shape[1], keys.shape[1]))[0]
