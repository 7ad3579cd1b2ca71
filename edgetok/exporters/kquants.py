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

All functions take float32 rows (N, K) as torch tensors and return uint8 numpy arrays (N, bytes).
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256  # a K-quant super-block
IQ4NL_BLOCK = 32
IQ4NL_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
BLOCK_VALUES = {"q4_k": QK_K, "q5_k": QK_K, "q6_k": QK_K, "iq4_nl": IQ4NL_BLOCK}
TYPES = tuple(BLOCK_VALUES)
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


def _affine_blocks(rows: torch.Tensor, nmax: int, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """rows (N, K) → per super-block fp16 d, dmin (B,), 6-bit sc, m (B, 8) and codes (B, 8, 32)."""
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
        best = _keep_better(best, [d, dmin, sc, mq, q, err])
    return tuple(best[:5])


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


def q4_k(rows: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
    d, dmin, sc, m, q = _affine_blocks(rows, 15, importance)
    body = _nibbles(q.to(torch.uint8).numpy())
    blocks = np.concatenate([_bytes(d), _bytes(dmin), _pack_scales(sc, m), body], axis=-1)
    return blocks.reshape(rows.shape[0], -1)


def q5_k(rows: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
    d, dmin, sc, m, q = _affine_blocks(rows, 31, importance)
    q = q.to(torch.uint8).numpy()  # (B, 8, 32)
    high = ((q >> 4) & 1).astype(np.uint8)  # bit j of byte i: sub-block j's code i
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    blocks = np.concatenate([_bytes(d), _bytes(dmin), _pack_scales(sc, m), qh, _nibbles(q & 0x0F)], axis=-1)
    return blocks.reshape(rows.shape[0], -1)


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


def q6_k(rows: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
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
        best = _keep_better(best, [d, sc, q, err])
    d, sc, q = best[:3]
    u = (q.reshape(-1, 2, 128) + 32).to(torch.uint8).numpy()  # (B, half, 128)
    ql = (u[:, :, :64] & 0x0F) | ((u[:, :, 64:] & 0x0F) << 4)  # (B, 2, 64)
    hi = (u >> 4).reshape(-1, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (B, 2, 32)
    scales = sc.to(torch.int8).numpy().view(np.uint8)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), scales, _bytes(d)], axis=-1)
    return blocks.reshape(rows.shape[0], -1)


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


def iq4_nl(rows: torch.Tensor, importance: torch.Tensor | None = None, tries: int = 7) -> np.ndarray:
    """llama.cpp's quantize_row_iq4_nl_impl: d from the block's peak, codes nearest on the grid,
    d refitted by weighted least squares; of the candidates that put the peak at grid[0] + t or at
    grid[-1] + t, |t| ≤ tries, the best. d is then rounded to fp16 and the codes chosen again."""
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
    d = _fp16(torch.where(peak.abs() < _EPS, torch.zeros_like(best_d), best_d))
    idx = _nearest(x / torch.where(d == 0, torch.ones_like(d), d)[:, None])
    idx = torch.where(d[:, None] == 0, torch.full_like(idx, 8), idx).to(torch.uint8).numpy()  # grid[8] = 1: d 0 → 0
    body = idx[:, :16] | (idx[:, 16:] << 4)
    return np.concatenate([_bytes(d), body], axis=-1).reshape(rows.shape[0], -1)


QUANTIZERS = {"q4_k": q4_k, "q5_k": q5_k, "q6_k": q6_k, "iq4_nl": iq4_nl}


def quantize_rows(rows: torch.Tensor, kind: str, chunk_rows: int = 4096, importance: torch.Tensor | None = None) -> np.ndarray:
    """rows (N, K), K a multiple of the type's block → GGUF blocks (N, K / block · block bytes),
    in pieces of rows (memory stays a few times one piece's size). importance (K,): an imatrix's
    values for the rows' inputs, weighting each column's rounding error."""
    assert rows.shape[-1] % BLOCK_VALUES[kind] == 0, (rows.shape, kind)
    rows = rows.float()
    with torch.inference_mode():
        return np.concatenate([QUANTIZERS[kind](rows[i : i + chunk_rows], importance)
                               for i in range(0, rows.shape[0], chunk_rows)])
