"""GGUF's K-quant and IQ4_NL blocks: choosing the codes and packing them as llama.cpp reads them.

gguf-py dequantizes these types but cannot write them; llama.cpp's own quantizer can, through its
C API only. Layouts (one row of K values = K / block values blocks, each laid out as below; gguf-py's
gguf.quants dequantizes exactly these bytes):

    q4_k  256 values, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales sc_j and mins m_j for
          its 8 sub-blocks of 32, 128 bytes of 4-bit codes q; value = d·sc_j·q − dmin·m_j
    q5_k  256 values, 176 bytes: as q4_k with a 5th bit per code (32 bytes of high bits)
    q6_k  256 values, 210 bytes: 6-bit codes q − 32 in 16 sub-blocks of 16, an int8 scale each, then
          fp16 d; value = d·sc_j·(q − 32)
    iq4_nl 32 values, 18 bytes: fp16 d and 4-bit indices into a fixed non-uniform grid of 16 int8
          values (llama.cpp's kvalues_iq4nl); value = d·grid[i]

The searches follow llama.cpp's reference quantizers (candidate scales around the block's range,
each refitted by weighted least squares, with llama.cpp's weights), plus what its rounding lacks:
the super-block scales (q4_k / q5_k: d and dmin, which round every sub-block scale to 6 bits;
q6_k: d) are chosen among 7 candidates by the super-block's error instead of set from its largest
sub-block scale; iq4_nl tries the block's peak near both ends of its asymmetric grid and picks
the codes for the fp16 scale it writes. (On SmolLM2 the q4_k / q5_k tensors come out with a third
less squared error than llama.cpp's: BENCHMARKS.md.)

Choosing the codes is two steps, so GPTQ can take the second: `fit` fixes the grid from the weights
(what each block stores besides its codes: the scales, mins and super-block scales, as these
searches choose them) and a `Grid` rounds codes onto it — to nearest for every column at once
(`quantize_rows`), or one column at a time with GPTQ's error feedback (exporters/quantize.py);
`Grid.blocks` packs the codes as llama.cpp reads them.

Functions take float32 rows (N, K) as torch tensors; blocks are uint8 numpy arrays (N, bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QK_K = 256  # a K-quant super-block
IQ4NL_BLOCK = 32
IQ4NL_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
BLOCK_VALUES = {"q4_k": QK_K, "q5_k": QK_K, "q6_k": QK_K, "iq4_nl": IQ4NL_BLOCK}
TYPES = tuple(BLOCK_VALUES)
GROUP = {"q4_k": 32, "q5_k": 32, "q6_k": 16, "iq4_nl": IQ4NL_BLOCK}  # values sharing one scale (and min)
# the values a code stands for, in units of its group's scale: code i is LEVELS[kind][i]
LEVELS = {"q4_k": tuple(range(16)), "q5_k": tuple(range(32)), "q6_k": tuple(range(-32, 32)), "iq4_nl": IQ4NL_GRID}
_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a block this close to zero is written as zeros
_SUPER_STEPS = torch.linspace(-0.03, 0.03, 7)  # relative changes of d / dmin tried per super-block (0: llama.cpp's choice)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16, as float32 (what a block's d holds)."""
    return x.half().float()


def _bytes(x: torch.Tensor) -> np.ndarray:
    """fp16 values (...) → their bytes (..., 2)."""
    return x.half().numpy().view(np.uint8).reshape(*x.shape, 2)


def _keep_better(best: list[torch.Tensor] | None, candidate: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per super-block, the candidate whose last entry (its error (B,)) is lower."""
    if best is None:
        return candidate
    better = candidate[-1] < best[-1]
    return [torch.where(better.view((-1,) + (1,) * (new.dim() - 1)), new, old) for new, old in zip(candidate, best)]


# -- q4_k / q5_k: affine sub-blocks --------------------------------------------------------------------
def _fit_affine(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """x, w (..., 32) → scale s ≥ 0, min m ≥ 0 (...) with x ≈ s·q − m, q in 0..nmax.

    As llama.cpp's make_qkx2_quants: candidate inverse scales (nmax + r) / (max − min) for r in
    [−1, 1] (21), codes rounded for each, then (s, m) refitted by weighted least squares; the lowest
    weighted error wins. The errors come from the sums alone (no reconstruction per candidate)."""
    lo = x.amin(-1).clamp(max=0)
    span = (x.amax(-1) - lo).clamp_min(_EPS)
    shifted = x - lo[..., None]
    sw, swx, swx2 = w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)

    def error(s, b, swl, swl2, swlx):  # Σ w (s·q + b − x)², expanded
        return s * s * swl2 + 2 * s * b * swl + b * b * sw - 2 * s * swlx - 2 * b * swx + swx2

    best_s, best_m, best_err = span / nmax, -lo, None
    for r in torch.linspace(-1.0, 1.0, steps + 1).tolist():
        q = (shifted * ((nmax + r) / span)[..., None]).round_().clamp_(0, nmax)
        wq = w * q
        swl, swl2, swlx = wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)
        det = sw * swl2 - swl * swl
        ok = det > 0
        det = det.where(ok, torch.ones_like(det))
        s = (sw * swlx - swx * swl) / det
        b = (swl2 * swx - swl * swlx) / det
        positive = b > 0  # the min must stay ≤ 0 (m ≥ 0): refit the scale alone
        s = torch.where(positive, swlx / swl2.clamp_min(_EPS), s)
        b = torch.where(positive, torch.zeros_like(b), b)
        err = error(s, b, swl, swl2, swlx)
        better = ok & (s > 0) if best_err is None else ok & (s > 0) & (err < best_err)
        best_err = torch.where(better, err, torch.full_like(err, float("inf")) if best_err is None else best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, -b, best_m)
    return best_s, best_m


def _importance_weights(x: torch.Tensor, importance: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """With an importance matrix (K,) per input column (llama.cpp's imatrix values, mean x² of
    the inputs), each weight's error counts as llama.cpp's quantizers count it:
    importance · sqrt(σ² + x²), σ² = 2 · the super-block's mean x² (x: (B, …) blocks of rows of
    width k). None: no importance matrix, the type's own weights."""
    if importance is None:
        return None
    per_row = k // x[0].numel()  # blocks per row
    imp = importance.float().reshape(per_row, *x.shape[1:]).repeat(x.shape[0] // per_row, *([1] * (x.dim() - 1)))
    sigma2 = 2 * x.pow(2).flatten(1).mean(-1).view(-1, *([1] * (x.dim() - 1)))
    return imp * (sigma2 + x * x).sqrt()


def _affine_grid(rows: torch.Tensor, nmax: int, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """rows (N, K) → per super-block fp16 d, dmin (B,) and 6-bit sc, m (B, 8)."""
    x = rows.reshape(-1, 8, 32).float()
    av = x.pow(2).mean((-1, -2), keepdim=True).sqrt()
    w = _importance_weights(x, importance, rows.shape[-1])
    if w is None:
        w = av + x.abs()  # llama.cpp's weights for q4_k / q5_k without an importance matrix
    s, m = _fit_affine(x, w, nmax)
    best: list[torch.Tensor] | None = None
    for step in _SUPER_STEPS.tolist():  # d and dmin: the 6-bit grid of the sub-block scales and mins
        d = _fp16(s.amax(-1) / 63 * (1 + step))
        dmin = _fp16(m.amax(-1) / 63 * (1 + step))
        sc = (s / d.clamp_min(_EPS)[:, None]).round().clamp(0, 63)
        mq = (m / dmin.clamp_min(_EPS)[:, None]).round().clamp(0, 63)
        scale, offset = d[:, None] * sc, dmin[:, None] * mq  # (B, 8): what llama.cpp computes with
        q = ((x + offset[..., None]) / scale.clamp_min(_EPS)[..., None]).round().clamp(0, nmax)
        q = torch.where(scale[..., None] > 0, q, torch.zeros_like(q))
        err = (w * (scale[..., None] * q - offset[..., None] - x) ** 2).sum((-1, -2))
        best = _keep_better(best, [d, dmin, sc, mq, err])
    return tuple(best[:4])


def _pack_scales(sc: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """6-bit sc, m (B, 8) → q4_k's 12 bytes per block (as gguf-py's Q4_K.get_scale_min unpacks)."""
    sc, m = sc.to(torch.uint8).numpy(), m.to(torch.uint8).numpy()
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    d_row = lo_sc | ((hi_sc >> 4) << 6)
    m_row = lo_m | ((hi_m >> 4) << 6)
    md_row = (hi_sc & 0x0F) | ((hi_m & 0x0F) << 4)
    return np.concatenate([d_row, m_row, md_row], axis=-1).astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """codes (B, 8, 32) → (B, 128): byte i of chunk c holds sub-block 2c's code i low, 2c+1's high."""
    q = q.reshape(q.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _pack_q4_k(stored: tuple[torch.Tensor, ...], q: np.ndarray) -> np.ndarray:
    d, dmin, sc, m = stored
    return np.concatenate([_bytes(d), _bytes(dmin), _pack_scales(sc, m), _nibbles(q.reshape(-1, 8, 32))], axis=-1)


def _pack_q5_k(stored: tuple[torch.Tensor, ...], q: np.ndarray) -> np.ndarray:
    d, dmin, sc, m = stored
    q = q.reshape(-1, 8, 32)
    high = ((q >> 4) & 1).astype(np.uint8)  # bit j of byte i: sub-block j's code i
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([_bytes(d), _bytes(dmin), _pack_scales(sc, m), qh, _nibbles(q & 0x0F)], axis=-1)


# -- q6_k: symmetric sub-blocks of 16 --------------------------------------------------------------------
def _fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 9) -> torch.Tensor:
    """x, w (..., n) → a signed scale s (...) with x ≈ s·q, q in −nmax..nmax−1 (llama.cpp's
    make_qx_quants: the value of largest magnitude maps to −nmax; candidates around it refitted)."""
    amax_at = x.abs().argmax(-1, keepdim=True)
    peak = x.gather(-1, amax_at).squeeze(-1)  # signed
    safe = torch.where(peak.abs() < _EPS, torch.ones_like(peak), peak)
    best_s, best_score = -peak / nmax, torch.full_like(peak, -1.0)
    for r in range(-steps, steps + 1):
        iscale = -(nmax + 0.1 * r) / safe
        q = (iscale[..., None] * x).round().clamp(-nmax, nmax - 1)
        sumlx, suml2 = (w * x * q).sum(-1), (w * q * q).sum(-1)
        score = torch.where(suml2 > 0, sumlx * sumlx / suml2.clamp_min(_EPS), torch.zeros_like(sumlx))
        better = score > best_score
        best_s = torch.where(better, sumlx / suml2.clamp_min(_EPS), best_s)
        best_score = torch.where(better, score, best_score)
    return torch.where(peak.abs() < _EPS, torch.zeros_like(best_s), best_s)


def _q6_k_grid(rows: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """rows (N, K) → per super-block fp16 d (B,) and int8 sub-block scales sc (B, 16)."""
    x = rows.reshape(-1, 16, 16).float()
    w = _importance_weights(x, importance, rows.shape[-1])
    if w is None:
        w = x * x  # llama.cpp's q6_k weights without an importance matrix
    s = _fit_symmetric(x, w, 32)  # (B, 16)
    peak = s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)  # the signed scale of largest magnitude
    best: list[torch.Tensor] | None = None
    for step in _SUPER_STEPS.tolist():
        d = _fp16(-peak / 128 * (1 + step))  # the peak maps to −128, as llama.cpp's iscale = −128 / max
        sc = (s / torch.where(d == 0, torch.ones_like(d), d)[:, None]).round().clamp(-128, 127)
        scale = d[:, None] * sc
        q = (x / torch.where(scale == 0, torch.ones_like(scale), scale)[..., None]).round().clamp(-32, 31)
        q = torch.where(scale[..., None] == 0, torch.zeros_like(q), q)
        err = (w * (scale[..., None] * q - x) ** 2).sum((-1, -2))
        best = _keep_better(best, [d, sc, err])
    return tuple(best[:2])


def _pack_q6_k(stored: tuple[torch.Tensor, ...], q: np.ndarray) -> np.ndarray:
    d, sc = stored
    u = q.reshape(-1, 2, 128)  # (B, half, 128): codes 0..63, the level + 32
    ql = (u[:, :, :64] & 0x0F) | ((u[:, :, 64:] & 0x0F) << 4)  # (B, 2, 64)
    hi = (u >> 4).reshape(-1, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (B, 2, 32)
    scales = sc.to(torch.int8).numpy().view(np.uint8)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), scales, _bytes(d)], axis=-1)


# -- iq4_nl: a non-uniform grid -------------------------------------------------------------------------
def _grid_lookup(grid: tuple[int, ...]) -> torch.Tensor:
    """Nearest grid index for every half-unit bin of [−128, 128): the midpoints between the (integer)
    grid values are multiples of ½, so a bin never straddles one and the table is exact."""
    centers = torch.arange(-128, 128, 0.5) + 0.25
    return (centers[:, None] - torch.tensor(grid, dtype=torch.float32)[None]).abs().argmin(-1)


_IQ4NL_LOOKUP = _grid_lookup(IQ4NL_GRID)


def _nearest(v: torch.Tensor) -> torch.Tensor:
    """Index of the iq4_nl grid value nearest to each of v (grid units)."""
    bins = v.add(128).mul_(2).floor_().clamp_(0, len(_IQ4NL_LOOKUP) - 1).long()
    return _IQ4NL_LOOKUP[bins]


def _iq4_nl_grid(rows: torch.Tensor, importance: torch.Tensor | None = None, tries: int = 7) -> tuple[torch.Tensor, ...]:
    """llama.cpp's quantize_row_iq4_nl_impl: d from the block's peak, codes nearest on the grid,
    d refitted by weighted least squares; of the candidates that put the peak at grid[0] + t or at
    grid[-1] + t, |t| ≤ tries, the best; rounded to the fp16 it is written as → (d (B,),)."""
    grid = torch.tensor(IQ4NL_GRID, dtype=torch.float32)
    x = rows.reshape(-1, IQ4NL_BLOCK).float()
    w = _importance_weights(x, importance, rows.shape[-1])
    if w is None:
        w = x * x
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    safe = torch.where(peak.abs() < _EPS, torch.ones_like(peak), peak)

    def fit(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = grid[_nearest(inv[:, None] * x)]
        sumqx, sumq2 = (w * q * x).sum(-1), (w * q * q).sum(-1)
        d = sumqx / sumq2.clamp_min(_EPS)
        return d, d * sumqx  # the scale, and how much error it removes (larger is better)

    best_d, best_gain = fit(grid[0] / safe)
    # the peak near either end of the grid, which is not symmetric (−127 .. 113): llama.cpp tries
    # the low end's neighbours and the high end itself
    for end in (grid[0].item(), grid[-1].item()):
        for t in range(-tries, tries + 1):
            d, gain = fit((end + t) / safe)
            better = gain > best_gain
            best_d, best_gain = torch.where(better, d, best_d), torch.where(better, gain, best_gain)
    return (_fp16(torch.where(peak.abs() < _EPS, torch.zeros_like(best_d), best_d)),)


def _pack_iq4_nl(stored: tuple[torch.Tensor, ...], idx: np.ndarray) -> np.ndarray:
    idx = idx.reshape(-1, IQ4NL_BLOCK)
    return np.concatenate([_bytes(stored[0]), idx[:, :16] | (idx[:, 16:] << 4)], axis=-1)


# -- the grid of a matrix, and its codes ---------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A matrix's grid in one of these types, fitted from its weights: what its blocks store besides
    the codes (`stored`, per super-block or block, in row order), and each group's scale and offset
    as llama.cpp computes them — a code stands for scale · LEVELS[kind][code] − offset."""

    kind: str
    stored: tuple[torch.Tensor, ...]  # q4_k / q5_k: d, dmin (B,), sc, m (B, 8); q6_k: d (B,), sc (B, 16); iq4_nl: d (B,)
    scale: torch.Tensor  # (N, K / GROUP[kind]) float32
    offset: torch.Tensor  # (N, K / GROUP[kind]) float32, 0 for the symmetric types

    def __post_init__(self) -> None:
        if self.kind not in TYPES:
            raise ValueError(f"no grid for {self.kind} (the grids are {', '.join(TYPES)})")
        if self.scale.shape != self.offset.shape or self.scale.dim() != 2:
            raise ValueError(f"scale {tuple(self.scale.shape)} and offset {tuple(self.offset.shape)} must be one (N, groups)")
        blocks = self.scale.numel() * GROUP[self.kind] // BLOCK_VALUES[self.kind]
        if any(t.shape[0] != blocks for t in self.stored):
            raise ValueError(f"{self.kind}'s stored block parameters are not one per block of the grid ({blocks})")

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale.shape[0], self.scale.shape[1] * GROUP[self.kind]

    def round(self, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x to the nearest level of its group (scale, offset broadcast with x) → (codes uint8, the
        values they stand for, computed as gguf-py's dequantization computes them). A group whose
        scale is 0 holds the level nearest 0, as llama.cpp writes it."""
        levels = _LEVELS[self.kind]
        v = (x + offset) / torch.where(scale == 0, torch.ones_like(scale), scale)
        if self.kind == "iq4_nl":
            code = _nearest(v)
        else:
            code = (v.round().clamp(levels[0].item(), levels[-1].item()) - levels[0]).long()
        code = torch.where(scale == 0, torch.full_like(code, _ZERO_CODE[self.kind]), code)
        return code.to(torch.uint8), _value(self.kind, code, scale, offset)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, K) on this grid → the values they stand for (N, K)."""
        n, k = codes.shape
        g = codes.long().reshape(n, -1, GROUP[self.kind])
        return _value(self.kind, g, self.scale[..., None], self.offset[..., None]).reshape(n, k)

    def nearest(self, w: torch.Tensor) -> torch.Tensor:
        """Every weight of w (N, K) rounded to nearest → codes (N, K)."""
        n, k = w.shape
        g = w.float().reshape(n, -1, GROUP[self.kind])
        return self.round(g, self.scale[..., None], self.offset[..., None])[0].reshape(n, k)

    def column(self, col: int, x: torch.Tensor, ahead=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Column `col` of the matrix, x (N,), rounded on this fixed grid (GPTQ's Rounding; `ahead`,
        the columns still to come, is for grids fitted as they go and not read here)."""
        g = col // GROUP[self.kind]
        return self.round(x, self.scale[:, g], self.offset[:, g])

    def blocks(self, codes: torch.Tensor) -> Blocks:
        """codes (N, K) on this grid → the matrix's blocks as llama.cpp reads them."""
        n = self.scale.shape[0]
        data = _PACKERS[self.kind](self.stored, codes.to(torch.uint8).numpy())
        return Blocks(self.kind, data.reshape(n, -1))


def _value(kind: str, code: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """scale · level − offset in float32, in gguf-py's order of operations (its dequantization is
    llama.cpp's values to the bit), so GPTQ's errors are those of the values llama.cpp reads."""
    return scale * _LEVELS[kind][code.long()] - offset


_LEVELS = {kind: torch.tensor(levels, dtype=torch.float32) for kind, levels in LEVELS.items()}
_ZERO_CODE = {kind: min(range(len(levels)), key=lambda i, lv=levels: abs(lv[i])) for kind, levels in LEVELS.items()}
_PACKERS = {"q4_k": _pack_q4_k, "q5_k": _pack_q5_k, "q6_k": _pack_q6_k, "iq4_nl": _pack_iq4_nl}


def fit(rows: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> Grid:
    """The grid llama.cpp's quantizer (as searched here) would choose for rows (N, K), K a multiple of
    the type's block; importance (K,): an imatrix's values (or a Hessian's diagonal) per input."""
    assert rows.shape[-1] % BLOCK_VALUES[kind] == 0, (rows.shape, kind)
    n = rows.shape[0]
    rows = rows.float()
    if kind in ("q4_k", "q5_k"):
        d, dmin, sc, m = stored = _affine_grid(rows, 15 if kind == "q4_k" else 31, importance)
        scale, offset = (d[:, None] * sc).reshape(n, -1), (dmin[:, None] * m).reshape(n, -1)
    elif kind == "q6_k":
        d, sc = stored = _q6_k_grid(rows, importance)
        scale = (d[:, None] * sc).reshape(n, -1)
        offset = torch.zeros_like(scale)
    else:
        stored = _iq4_nl_grid(rows, importance)
        scale = stored[0].reshape(n, -1)
        offset = torch.zeros_like(scale)
    return Grid(kind, stored, scale, offset)


@dataclass(frozen=True)
class Blocks:
    """A matrix as blocks of one GGUF block type, as written: row r's blocks are data[r]. The
    types here, as a Grid packs them, or any block type a GGUF source stores (written again as
    they are: exporters/gguf_codes.source_blocks)."""

    kind: str  # a GGUF type's name in lower case
    data: np.ndarray  # (N, K / the type's block values · the block's bytes) uint8

    def __post_init__(self) -> None:
        import gguf

        qtype = gguf.GGMLQuantizationType.__members__.get(self.kind.upper())
        if qtype is None or gguf.GGML_QUANT_SIZES[qtype][0] == 1 or self.data.dtype != np.uint8 or self.data.ndim != 2:
            raise ValueError(f"blocks are (rows, bytes) uint8 of a GGUF block type, "
                             f"not {self.data.dtype} {self.data.shape} of {self.kind}")

    @property
    def shape(self) -> tuple[int, int]:
        import gguf

        values, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.kind.upper()]]
        return self.data.shape[0], self.data.shape[1] // size * values

    def rows(self, index: torch.Tensor | slice) -> Blocks:
        """The rows `index` (a slice or a permutation), each with its own blocks."""
        return Blocks(self.kind, self.data[index if isinstance(index, slice) else np.asarray(index)])

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32, as gguf-py decodes the blocks (llama.cpp's values)."""
        import gguf
        from gguf.quants import dequantize

        values = dequantize(self.data, gguf.GGMLQuantizationType[self.kind.upper()])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(self.shape)

    @staticmethod
    def cat_rows(parts: list[Blocks]) -> Blocks:
        """Row blocks of one type stacked."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"stacked rows must share one type, not {', '.join(sorted(kinds))}")
        return Blocks(parts[0].kind, np.concatenate([p.data for p in parts]))


def quantize_rows(rows: torch.Tensor, kind: str, chunk_rows: int = 4096, importance: torch.Tensor | None = None) -> np.ndarray:
    """rows (N, K), K a multiple of the type's block → GGUF blocks (N, K / block · block bytes),
    rounded to nearest, in pieces of rows (memory stays a few times one piece's size). importance
    (K,): an imatrix's values for the rows' inputs, weighting each column's rounding error."""
    rows = rows.float()

    def piece(w: torch.Tensor) -> np.ndarray:
        grid = fit(w, kind, importance)
        return grid.blocks(grid.nearest(w)).data

    with torch.inference_mode():
        return np.concatenate([piece(rows[i : i + chunk_rows]) for i in range(0, rows.shape[0], chunk_rows)])
