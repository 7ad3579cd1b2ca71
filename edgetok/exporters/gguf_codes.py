"""A GGUF's stored codes as QuantizedWeights: `--weights source` carries them into ONNX MatMulNBits
without rounding them again.

Every llama.cpp block type below stores values as scale · (code − zero), some with an offset; that
is MatMulNBits' block with its zero point (an offset is a fractional zero point, which
onnx_rewrites.pack_matmul_nbits turns into its per-block offsets). Codes of 5 to 8 bits ride in
8-bit blocks. The values are the GGUF's up to the fp16 storage of the graph's scales and offsets.

| type | values in a block (MatMulNBits group)      | carried as                         |
|------|--------------------------------------------|------------------------------------|
| Q4_0 | d·(q − 8), q 4-bit, 32                     | 4 bits, zero 8                     |
| Q4_1 | d·q + m, 32                                | 4 bits, fractional zero −m/d       |
| Q5_0 | d·(q − 16), q 5-bit, 32                    | 8 bits, zero 16                    |
| Q5_1 | d·q + m, q 5-bit, 32                       | 8 bits, fractional zero            |
| Q8_0 | d·q, q int8, 32                            | 8 bits, zero 128                   |
| Q4_K | d·sc·q − dmin·m, q 4-bit, 32 (in 256)      | 4 bits, fractional zero            |
| Q5_K | the same with 5-bit q                      | 8 bits, fractional zero            |
| Q6_K | d·sc·(q − 32), q 6-bit, sc int8, 16 (in 256) | 8 bits, zero 32, group 16        |

Other types (Q2_K, Q3_K, the IQ and TQ families) are not carried: `source_quantizer` rounds those
matrices again and says so in the export's report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from edgetok.exporters.kquants import Blocks
from edgetok.exporters.quantize import QuantizedWeight
from edgetok.models.checkpoint import part_rows
from edgetok.models.config import ModelConfig
from edgetok.models.gguf_file import named_tensors, open_gguf, permuted_heads, unpermute_qk
from edgetok.models.names import FUSED, fused_parts

QK_K = 256  # a K-quant super-block


def _f16(raw: np.ndarray) -> np.ndarray:
    """(blocks, 2) uint8 → (blocks, 1) float32."""
    return raw.copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """(blocks, n) packed bytes → (blocks, 2n) 4-bit codes: each run of `run` bytes gives its low
    nibbles, then its high ones (llama.cpp's layout for runs of 16 (Q4_0) and 32 (K-quants))."""
    b = qs.shape[0]
    q = qs.reshape(b, -1, 1, run) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 15).reshape(b, -1)


def _bits(qh: np.ndarray, count: int) -> np.ndarray:
    """(blocks, count/8) bytes → (blocks, count) single bits, the first value in the low bit."""
    return np.unpackbits(qh, axis=-1, count=count, bitorder="little")


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and mins → (blocks, 8) each."""
    d, m, md = np.split(scales.reshape(-1, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
    return sc.reshape(-1, 8).astype(np.float32), mn.reshape(-1, 8).astype(np.float32)


# Each decoder: the blocks (blocks, bytes) → codes (blocks, values), scales (blocks, groups), and the
# zero points (blocks, groups): an integer (uint8) or the offset c of values scale·q − c (float).
def _q4_0(b):
    return _nibbles(b[:, 2:], 16), _f16(b[:, :2]), np.full((len(b), 1), 8, np.uint8)


def _q4_1(b):
    return _nibbles(b[:, 4:], 16), _f16(b[:, :2]), -_f16(b[:, 2:4])


def _q5_0(b):
    q = _nibbles(b[:, 6:], 16) | (_bits(b[:, 2:6], 32) << 4)
    return q, _f16(b[:, :2]), np.full((len(b), 1), 16, np.uint8)


def _q5_1(b):
    q = _nibbles(b[:, 8:], 16) | (_bits(b[:, 4:8], 32) << 4)
    return q, _f16(b[:, :2]), -_f16(b[:, 2:4])


def _q8_0(b):
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(b[:, :2]), np.full((len(b), 1), 128, np.uint8)


def _q4_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    return _nibbles(b[:, 16:], 32), _f16(b[:, :2]) * sc, _f16(b[:, 2:4]) * mn


def _q5_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    high = _bits(b[:, 16:48], QK_K).reshape(len(b), 32, 8).transpose(0, 2, 1)  # bit j of byte i: value 32·j + i's
    q = _nibbles(b[:, 48:], 32) | (high << 4).reshape(len(b), -1)
    return q, _f16(b[:, :2]) * sc, _f16(b[:, 2:4]) * mn


def _q6_k(b):
    n = len(b)
    low = b[:, :128].reshape(n, 2, 1, 2, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1, 1)
    low = (low & 15).reshape(n, 2, 4, 32)  # per 128-value half: bytes 0-31 and 32-63, low then high nibbles
    high = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (low | ((high & 3) << 4)).reshape(n, QK_K)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
    return q, scale, np.full((n, 16), 32, np.uint8)


# type → (decoder, values per block, values per group, bits of MatMulNBits that hold the codes)
DECODERS: dict[T, tuple[Callable, int, int, int]] = {
    T.Q4_0: (_q4_0, 32, 32, 4), T.Q4_1: (_q4_1, 32, 32, 4), T.Q5_0: (_q5_0, 32, 32, 8), T.Q5_1: (_q5_1, 32, 32, 8),
    T.Q8_0: (_q8_0, 32, 32, 8), T.Q4_K: (_q4_k, QK_K, 32, 4), T.Q5_K: (_q5_k, QK_K, 32, 8), T.Q6_K: (_q6_k, QK_K, 16, 8),
}


def decode(blocks: np.ndarray, qtype: T, shape: tuple[int, int]) -> QuantizedWeight | None:
    """A 2-D tensor's raw blocks (N, bytes per row) → its codes, or None for a type not carried."""
    if qtype not in DECODERS:
        return None
    decoder, per_block, group, bits = DECODERS[qtype]
    n, k = shape
    q, scale, zero = decoder(np.ascontiguousarray(blocks).reshape(n * k // per_block, -1))
    zero = np.broadcast_to(zero, scale.shape)
    if zero.dtype != np.uint8:  # an offset c: values scale·q − c = scale·(q − c/scale)
        offset, empty = zero, scale == 0  # empty: a group of equal values −c: codes 0, zero 1, scale c
        zero = np.divide(offset, scale, out=np.ones_like(scale), where=~empty)
        scale = np.where(empty, offset, scale)
        q = np.where(np.repeat(empty, group, axis=1), 0, q)
    groups = k // group
    return QuantizedWeight(torch.from_numpy(np.ascontiguousarray(q.reshape(n, k), np.uint8)),
                           torch.from_numpy(np.ascontiguousarray(scale.reshape(n, groups), np.float32)),
                           torch.from_numpy(np.array(zero.reshape(n, groups))), bits, group)


def source_codes(path: Path, cfg: ModelConfig) -> tuple[dict[str, QuantizedWeight], dict[str, str]]:
    """The GGUF's 2-D weights as codes, HF-named (q/k rows unpermuted, stacked tensors split) →
    (codes of the carried tensors, every 2-D tensor's GGUF type)."""
    reader, _, _ = open_gguf(path)
    codes, types = {}, {}
    for name, t, shape in named_tensors(path, reader, cfg):
        if len(shape) != 2:
            continue
        types |= dict.fromkeys(fused_parts(name) or [name], t.tensor_type.name)
        qw = decode(t.data, t.tensor_type, shape)
        if qw is not None:
            codes |= _hf_rows(name, cfg, shape, qw)
    return codes, types


def source_blocks(path: Path, cfg: ModelConfig) -> dict[str, Blocks]:
    """The GGUF's block-quantized 2-D weights as they are stored, HF-named as source_codes names
    them: a GGUF written again keeps them where it gives a tensor its source's type (decoding and
    rounding again can move a code: a q6_k or q4_k fit recovers all but a few blocks)."""
    reader, _, _ = open_gguf(path)
    blocks = {}
    for name, t, shape in named_tensors(path, reader, cfg):
        if len(shape) == 2 and t.tensor_type.name not in ("F32", "F16", "BF16"):
            blocks |= _hf_rows(name, cfg, shape, Blocks(t.tensor_type.name.lower(), np.asarray(t.data).reshape(shape[0], -1)))
    return blocks


def _hf_rows(name: str, cfg: ModelConfig, shape: tuple[int, int], stored: QuantizedWeight | Blocks) -> dict:
    """A file tensor's rows (anything with `rows`) → HF name → its rows in the HF order: q/k rows
    unpermuted (as read_gguf's unpermute_qk puts the values), a stacked tensor split into its parts."""
    heads = permuted_heads(name, cfg)
    if heads is not None:
        stored = stored.rows(torch.from_numpy(unpermute_qk(np.arange(shape[0]), heads).copy()))
    parts = fused_parts(name) or [name]
    if len(parts) == 1:
        return {name: stored}
    fused = next(f for f in FUSED if f".{f}." in name)
    bounds = np.cumsum([0, *part_rows(cfg, fused)])
    return {p: stored.rows(slice(a, b)) for p, a, b in zip(parts, bounds[:-1], bounds[1:])}
