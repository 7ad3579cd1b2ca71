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
from dataclasses import dataclass

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.kernels.token_scores import KeySketch

try:
    from edgetok.kernels import _mixed_attention as _native
except ImportError:  # not built: runs fall back to the reference (the cache's stats say which ran)
    _native = None

# The columns of a table row (int64), in order. Pointers are addresses in this process.
FIELDS = ("bits", "length", "k", "v", "k_scale", "k_zero", "v_scale", "v_zero", "head_stride", "token_stride", "causal")
BITS, LENGTH, K, V, K_SCALE, K_ZERO, V_SCALE, V_ZERO, HEAD_STRIDE, TOKEN_STRIDE, CAUSAL = range(len(FIELDS))
FLOAT_BITS = {torch.float32: 32, torch.bfloat16: 16}
# A slab layer's record in a StepTables step (int64; mixed_attention.cpp's SlabField, in order), and its
# float32 io row: the selection's temperature and coverage target in; out, what it read and the
# microseconds its parts took, then each query head's captured mass at sampled steps.
SLAB_FIELDS = ("k", "v", "head_stride", "n", "chunk_size", "n_chunks", "abstracts", "stride", "pinned", "keep", "sinks",
               "recent", "per_head", "sampled", "io", "channels", "least", "sketch", "sketch_stride", "sketch_low",
               "sketch_step")
IO_FIELDS = ("temperature", "coverage", "estimated", "chunks", "tokens", "select_us", "attend_us", "measure_us")


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


def row(bits: int, length: int, k: int, v: int, k_scale: int = 0, k_zero: int = 0, v_scale: int = 0, v_zero: int = 0,
        head_stride: int = 0, token_stride: int = 0, causal: bool = False, slides: int = 0) -> list[int]:
    """A table row (FIELDS) from addresses: what float_row and quantized_row make of tensors, for a
    caller that has only a buffer's address and its layout (codec.kernel_row). slides: see float_row."""
    assert not (causal and slides)
    return [bits, length, k, v, k_scale, k_zero, v_scale, v_zero, head_stride, token_stride, -slides if slides else int(causal)]


def float_row(k: torch.Tensor, v: torch.Tensor, causal: bool = False, slides: int = 0) -> list[int]:
    """A row for float K/V (Hkv, S, D), float32 or bf16, channels contiguous, k and v strided alike.
    causal: the last T tokens are the queries' own (the window during a decode step). slides: the
    width W of the sliding window whose past these tokens are: query token t of T sees them from
    S + t − (W − 1) on (a draft's later tokens have slid past the oldest; 0: it sees them all)."""
    assert k.dtype == v.dtype and k.dtype in FLOAT_BITS, (k.dtype, v.dtype)
    assert k.stride() == v.stride() and k.stride(2) == 1, (k.stride(), v.stride())
    return row(FLOAT_BITS[k.dtype], k.shape[1], k.data_ptr(), v.data_ptr(), head_stride=k.stride(0), token_stride=k.stride(1),
               causal=causal, slides=slides)


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
    return row(bits, length, kc.data_ptr(), vc.data_ptr(), ks.data_ptr(), kz.data_ptr(), vs.data_ptr(), vz.data_ptr())


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


def select(q: torch.Tensor, abstracts: torch.Tensor, pinned: torch.Tensor | None, plans: torch.Tensor,
           temperatures: torch.Tensor, coverage: float | None, per_head: bool, isa: str = "auto",
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """selection.select_chunks natively (that is its oracle), one pass over each layer's abstracts.

    q (L, Hq, D); abstracts (L, Hkv, 2D, stride) bf16 (selection.stored_abstracts), contiguous, of which layer l's first
    plans[l, 0] columns are its chunks; pinned (L, stride) bool or None; plans (L, 4) int64: count,
    keep, sinks, recent (keep -1: the layer reads every chunk, nothing selected); temperatures (L,).
    → ids (L, groups, C), n (L, groups): each group's first n chunk ids count, ascending (groups:
    Hkv per head, else 1); estimated (L,) coverage, as select_chunks'."""
    layers, hkv, two_d, stride = abstracts.shape
    hq, d = q.shape[1], two_d // 2
    groups = hkv if per_head else 1
    row = max(1, int(plans[:, 0].max())) if layers else 1
    ids, n = np.zeros((layers, groups, row), np.int64), np.zeros((layers, groups), np.int64)
    estimated = np.ones(layers, np.float32)
    assert abstracts.dtype == torch.bfloat16 and abstracts.is_contiguous()
    no_pins = np.zeros(0, np.uint8)
    _native.select(q.detach().float().contiguous().numpy(), abstracts.view(torch.int16).numpy(),
                   no_pins if pinned is None else pinned.contiguous().numpy().view(np.uint8),
                   np.ascontiguousarray(plans.numpy(), np.int64), temperatures.float().contiguous().numpy(), ids, n, estimated,
                   hkv, hq // hkv, d, stride, 0.0 if coverage is None else coverage, per_head, isa)
    return ids, n, estimated


@dataclass(frozen=True)
class SlabStep:
    """One layer of a native decode step over float slabs (StepTables.set_slab): the slabs (Hkv,
    capacity, D), n tokens stored and room for the step's; the first n_chunks chunks of chunk_size
    tokens, selected from by selection.select_chunks' inputs for one layer — abstracts (Hkv, 2D,
    stride) bf16, pinned (stride,), plan (keep, sinks, recent; None: read them all), the temperature
    and coverage target, per-head; sampled: measure the captured mass this step. channels > 0:
    rank by token scores on that many channels (token_scores.py: the chunks' keys from `sketch`,
    the window's from the bf16 slab) instead of the abstracts' bounds, reading at least `least`
    chunks under a coverage target."""

    slab_k: torch.Tensor
    slab_v: torch.Tensor
    n: int
    chunk_size: int
    n_chunks: int
    abstracts: torch.Tensor
    pinned: torch.Tensor
    plan: tuple[int, int, int] | None
    temperature: float
    coverage: float | None
    per_head: bool
    sampled: bool
    channels: int = 0
    least: int = 0
    sketch: KeySketch | None = None

    def __post_init__(self) -> None:
        k, v = self.slab_k, self.slab_v
        sketched = self.sketch is not None and self.sketch.n == self.n_chunks * self.chunk_size
        assert self.channels == 0 or (k.dtype == torch.bfloat16 and sketched), "token scores: bf16 slabs, a sketch of the chunks"
        assert k.dtype == v.dtype and k.stride() == v.stride() and k.stride(2) == 1, "slabs: (Hkv, capacity, D), alike"
        assert k.shape[1] >= self.n + 1, "the slab needs room for the step's token"
        assert 0 <= self.n_chunks * self.chunk_size <= self.n and self.chunk_size > 0
        assert self.abstracts.dtype == torch.bfloat16 and self.abstracts.is_contiguous() and self.pinned.is_contiguous()
        assert self.abstracts.shape[-1] >= self.n_chunks and self.pinned.shape[-1] >= self.n_chunks


class StepTables:
    """A graph's decode step attended natively (mixed_attention.cpp's edgetok_attend_from_tables, the
    hook edgetok's GroupQueryAttention calls; ort_ops.attending_through): per layer, either a table
    made before the graph runs (`set`: the operator adds the layer's new tokens as the causal row),
    or a slab (`set_slab`: the hook stores the new tokens in it, selects the layer's chunks with the
    step's last query and reads them in place). A step runs `tokens` tokens (more than one: a draft
    being verified, whose later tokens see a sliding window's past slide); the hook writes each
    layer's queries into `queries` (T, Hq, D). The tables' memory (and what their rows point at) must
    stay alive until the step ends."""

    # layers, n_kv, head_dim, vgroup, threads, isa, query heads per KV head, the new tokens' bits, parallel_for,
    # the step's tokens
    HEADER = 10

    def __init__(self, layers: int, n_kv: int, n_heads: int, head_dim: int, dtype: torch.dtype, tokens: int = 1,
                 threads: int = 1) -> None:
        """dtype: the cache's: the new tokens are read (and stored, in a slab) as it stores them (bf16 rounded)."""
        self.queries = np.zeros((layers, tokens, n_heads, head_dim), np.float32)
        self.desc = np.zeros(self.HEADER + 3 * layers, np.int64)
        self.desc[: self.HEADER] = (layers, n_kv, head_dim, value_group(head_dim), threads, 0, n_heads // n_kv,
                                    FLOAT_BITS[dtype], 0, tokens)
        self.slabs = np.zeros((layers, len(SLAB_FIELDS)), np.int64)
        self.io = np.zeros((layers, len(IO_FIELDS) + n_heads), np.float32)  # (+ each query head's captured mass)
        self.dtype = dtype
        self.from_tables = False  # a layer was `set`: its new tokens join the cache after the run (the op's present)
        self._alive: list[np.ndarray] = []

    def set(self, layer: int, tables: list[np.ndarray]) -> None:
        """Layer's table: one for all KV heads, or one per KV head (rows pointing at that head)."""
        tables = [np.ascontiguousarray(t, np.int64) for t in tables]
        groups = np.array([[t.ctypes.data, len(t)] for t in tables], np.int64)
        self._alive += [groups, *tables]
        self.from_tables = True
        at = self.HEADER + 3 * layer
        self.desc[at : at + 3] = (len(tables), groups.ctypes.data, self.queries[layer].ctypes.data)

    def set_slab(self, layer: int, slab: SlabStep) -> None:
        """Layer's K/V in float slabs, its chunks selected inside the step (SlabStep)."""
        assert slab.slab_k.dtype == self.dtype, "the slab holds the cache's dtype, as the new tokens are stored"
        keep, sinks, recent = slab.plan if slab.plan is not None else (-1, 0, 0)
        self.io[layer, :2] = slab.temperature, 0.0 if slab.coverage is None else slab.coverage
        self.slabs[layer] = (slab.slab_k.data_ptr(), slab.slab_v.data_ptr(), slab.slab_k.stride(0), slab.n, slab.chunk_size,
                             slab.n_chunks, slab.abstracts.data_ptr(), slab.abstracts.shape[-1], slab.pinned.data_ptr(),
                             keep, sinks, recent, int(slab.per_head), int(slab.sampled), self.io[layer].ctypes.data,
                             slab.channels, slab.least, *_sketch_fields(slab.sketch if slab.channels else None))
        at = self.HEADER + 3 * layer
        self.desc[at : at + 3] = (0, self.slabs[layer].ctypes.data, self.queries[layer].ctypes.data)

    @property
    def tokens(self) -> int:
        """The step's tokens (T)."""
        return self.queries.shape[1]

    def run_on(self, threads: int, parallel_for: int) -> None:
        """Attend on another runtime's `threads` threads: parallel_for, the address of a C function
        `int (void (*fn)(void*, size_t), size_t n, void* user)` (ort_ops.hook_parallel_for: the
        graph's own intra-op threads, idle while the hook runs)."""
        self.desc[4], self.desc[8] = threads, parallel_for

    def read_layers(self, layers: list[int], field: str) -> np.ndarray:
        """What the hook reported for these slab layers (IO_FIELDS), float32 (len(layers),)."""
        return self.io[layers, IO_FIELDS.index(field)]

    def captured_mass(self, layer: int) -> np.ndarray:
        """(Hq,) a sampled slab layer's captured mass per query head."""
        return self.io[layer, len(IO_FIELDS) :]

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



def _sketch_fields(sketch: KeySketch | None) -> tuple[int, int, int, int]:
    """A slab record's sketch, sketch_stride, sketch_low and sketch_step (0: none)."""
    if sketch is None or sketch.low is None:
        return 0, 0, 0, 0
    assert sketch.packed.is_contiguous() and sketch.low.is_contiguous() and sketch.step.is_contiguous()
    return sketch.packed.data_ptr(), sketch.packed.shape[2], sketch.low.data_ptr(), sketch.step.data_ptr()


def select_tokens(q: torch.Tensor, slab: torch.Tensor, sketch: KeySketch, tokens: int, count: int, size: int,
                  pinned: torch.Tensor, keep: int, sinks: int, recent: int, least: int, coverage: float | None, per_head: bool,
                  channels: int, isa: str = "auto") -> tuple[list[torch.Tensor], float]:
    """token_scores.token_masses over the sketch's keys then select_by_masses natively (they are
    its oracle), for one layer: q (Hq, D); slab (Hkv, capacity, D) bf16, contiguous, whose first
    `tokens` rows per head are the layer's keys, the first count × size of them in chunks, which
    `sketch` holds (the window is read from the slab); pinned (≥ count,) bool.
    → each group's chunk ids (ascending; groups: Hkv per head, else 1), the estimated coverage."""
    hkv, capacity, d = slab.shape
    assert slab.dtype == torch.bfloat16 and slab.is_contiguous() and sketch.n == count * size
    groups = hkv if per_head else 1
    ids, n = np.zeros((groups, max(count, 1)), np.int64), np.zeros(groups, np.int64)
    low, step = (sketch.low, sketch.step) if sketch.low is not None else (torch.zeros(hkv, d), torch.ones(hkv, d))
    packed = sketch.packed if sketch.packed.shape[0] else torch.zeros(hkv, d, 0, dtype=torch.uint8)
    estimated = _native.select_tokens(q.detach().float().contiguous().numpy(), slab.view(torch.int16).numpy(),
                                      packed.contiguous().numpy(), low.float().contiguous().numpy(),
                                      step.float().contiguous().numpy(), pinned[:count].contiguous().numpy().view(np.uint8),
                                      ids, n, capacity * d, packed.shape[2], tokens, count, size, keep, sinks, recent, least, hkv,
                                      q.shape[0] // hkv, d, channels, 0.0 if coverage is None else coverage, per_head, isa)
    return [torch.from_numpy(row[:k]) for row, k in zip(ids, n)], estimated
