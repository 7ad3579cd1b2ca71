"""The mixed-bit attention op: decode attention of each KV head's query group over a list of
chunks, each read at its stored width (float32 / bf16 / int8 / int4 / int2), dequantized in
registers and never staged as float. The contract (shapes, the table, the CUDA story) is in
mixed_attention.md beside this file; the oracle is runtimes/kv/codec.py's `attend_reference`.

This module is the torch-free face of the native kernel (`_mixed_attention`, built from
mixed_attention.cpp by the package build): table rows that point at a chunk's memory, and `attend`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from edgetok.errors import EdgetokError

try:
    from edgetok.kernels import _mixed_attention as _native
except ImportError:  # not built: runs fall back to the reference (the cache's stats say which ran)
    _native = None

# The columns of a table row (int64), in order. Pointers are addresses in this process.
FIELDS = ("bits", "length", "k", "v", "k_scale", "k_zero", "v_scale", "v_zero", "head_stride", "token_stride", "causal")
BITS, LENGTH, K, V, K_SCALE, K_ZERO, V_SCALE, V_ZERO, HEAD_STRIDE, TOKEN_STRIDE, CAUSAL = range(len(FIELDS))
FLOAT_BITS = {torch.float32: 32, torch.bfloat16: 16}


def available() -> bool:
    """Whether the native kernel was built (pip install -e . / make install builds it)."""
    return _native is not None


def supports(head_dim: int) -> bool:
    """Whether the native kernel is built and runs this head size (a multiple of 16 up to 512 that
    the value groups divide)."""
    return _native is not None and head_dim % 16 == 0 and 0 < head_dim <= 512 and head_dim % value_group(head_dim) == 0


def isas() -> list[str]:
    """The instruction sets the native kernel can run here, best first (what 'auto' picks)."""
    return _native.isas() if _native is not None else []


def value_group(head_dim: int) -> int:
    """Channels per value scale (codec.encode's groups: one per token up to 64 channels)."""
    return head_dim if head_dim <= 64 else 64


def float_row(k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> list[int]:
    """A row for float K/V (Hkv, S, D), float32 or bf16, channels contiguous, k and v strided alike.
    causal: the last T tokens are the queries' own (the window during a decode step)."""
    assert k.dtype == v.dtype and k.dtype in FLOAT_BITS, (k.dtype, v.dtype)
    assert k.stride() == v.stride() and k.stride(2) == 1, (k.stride(), v.stride())
    return [FLOAT_BITS[k.dtype], k.shape[1], k.data_ptr(), v.data_ptr(), 0, 0, 0, 0, k.stride(0), k.stride(1), int(causal)]


def slab_rows(slab_k: torch.Tensor, slab_v: torch.Tensor, starts: torch.Tensor, length: int) -> np.ndarray:
    """Rows for chunks of `length` tokens at token offsets `starts` (n,) of float slabs (Hkv, cap, D):
    one vectorized step for a whole selection."""
    n = len(starts)
    rows = np.zeros((n, len(FIELDS)), np.int64)
    if n == 0:
        return rows
    offset = starts.numpy().astype(np.int64) * slab_k.stride(1) * slab_k.element_size()  # bytes
    rows[:, BITS], rows[:, LENGTH] = FLOAT_BITS[slab_k.dtype], length
    rows[:, K], rows[:, V] = slab_k.data_ptr() + offset, slab_v.data_ptr() + offset
    rows[:, HEAD_STRIDE], rows[:, TOKEN_STRIDE] = slab_k.stride(0), slab_k.stride(1)
    return rows


def quantized_row(bits: int, length: int, kc: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor,
                  vc: torch.Tensor, vs: torch.Tensor, vz: torch.Tensor) -> list[int]:
    """A row for a quantized chunk as codec.encode stores it (every tensor contiguous): key codes
    (Hkv, D, S·bits/8) with fp16 scale / zero (Hkv, D, 1) per channel; value codes (Hkv, S, D·bits/8)
    with fp16 scale / zero (Hkv, S, D/vgroup) per token and channel group."""
    tensors = (kc, ks, kz, vc, vs, vz)
    assert all(t.is_contiguous() for t in tensors) and ks.dtype == torch.float16
    return [bits, length, kc.data_ptr(), vc.data_ptr(), ks.data_ptr(), kz.data_ptr(), vs.data_ptr(), vz.data_ptr(), 0, 0, 0]


def attend(q: torch.Tensor, table: np.ndarray, n_kv: int, threads: int = 1, isa: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, D) float32 over the chunks of `table` (n, len(FIELDS)) → out (Hq, T, D) float32 and
    the log-sum-exp of each row's scores (Hq, T) (-inf where no token was visible). Query head h
    reads KV head h // (Hq / n_kv); every table row counts for every KV head. The memory the rows
    point at must stay alive and unchanged during the call."""
    if _native is None:
        raise EdgetokError("edgetok's native attention kernel is not built: run `pip install -e .` (or `make install`) "
                           "in edgetok's folder")
    hq, t, d = q.shape
    out = np.empty((hq, t, d), np.float32)
    lse = np.empty((hq, t), np.float32)
    _native.attend(q.detach().float().contiguous().numpy(), out, lse, np.ascontiguousarray(table, np.int64), n_kv,
                   hq // n_kv * t, t, d, value_group(d), 1.0 / math.sqrt(d), threads, isa)
    return torch.from_numpy(out), torch.from_numpy(lse)


class StepTables:
    """A graph's decode step attended natively (mixed_attention.cpp's edgetok_attend_from_tables, the
    hook edgetok's GroupQueryAttention calls; ort_ops.attending_through): every layer's table, made
    before the graph runs, and the descriptor the hook reads. The operator adds each layer's new
    tokens as the causal row and writes the step's last query into q_last (Hq, D) per layer. The
    tables' memory (and what their rows point at) must stay alive until the step ends."""

    HEADER = 8  # layers, n_kv, head_dim, vgroup, threads, isa, query heads per KV head, the new tokens' bits

    def __init__(self, layers: int, n_kv: int, n_heads: int, head_dim: int, dtype: torch.dtype, threads: int = 1) -> None:
        """dtype: the cache's: the new tokens are read as it will store them (bf16 rounded)."""
        self.q_last = np.zeros((layers, n_heads, head_dim), np.float32)
        self.desc = np.zeros(self.HEADER + 3 * layers, np.int64)
        self.desc[: self.HEADER] = (layers, n_kv, head_dim, value_group(head_dim), threads, 0, n_heads // n_kv,
                                    FLOAT_BITS[dtype])
        self._alive: list[np.ndarray] = []

    def set(self, layer: int, tables: list[np.ndarray]) -> None:
        """Layer's table: one for all KV heads, or one per KV head (rows pointing at that head)."""
        tables = [np.ascontiguousarray(t, np.int64) for t in tables]
        groups = np.array([[t.ctypes.data, len(t)] for t in tables], np.int64)
        self._alive += [groups, *tables]
        at = self.HEADER + 3 * layer
        self.desc[at : at + 3] = (len(tables), groups.ctypes.data, self.q_last[layer].ctypes.data)

    @property
    def user(self) -> int:
        return self.desc.ctypes.data


@functools.cache
def tables_hook() -> int:
    """The address of the native hook (edgetok_attend_from_tables) an ATTEND_HOOK can be cast from
    (looked up once: every decode step asks)."""
    import ctypes

    if _native is None:
        raise EdgetokError("edgetok's native attention kernel is not built: run `pip install -e .` (or `make install`) "
                           "in edgetok's folder")
    return ctypes.cast(ctypes.CDLL(_native.__file__).edgetok_attend_from_tables, ctypes.c_void_p).value

