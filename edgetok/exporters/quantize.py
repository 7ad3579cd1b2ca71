"""Weight quantization for the exporters: group-wise integer weights, W ≈ (q - zero) · scale.

A linear layer's weight W (N out, K in) is cut along K into groups of `group_size` inputs; each
(row, group) has one scale and one integer zero point. Every artifact writer (ONNX MatMulNBits,
ONNX QDQ, GGUF blocks) consumes a `QuantizedWeight`, whichever method chose its codes:

- `rtn`: round to nearest on each group's min/max (or ±absmax) grid.
- `gptq`: the same grid, codes chosen column by column with the error pushed onto the columns
  not yet quantized through the inverse Hessian of the layer's calibration inputs (GPTQ).
- `gptq_as`: GPTQ's codes on a GGUF type's own grid: q4_0 / q5_0 / q8_0's groups of 32 as above,
  or the K-quants' and iq4_nl's grid fixed first from the weights (exporters/kquants.py's `fit`),
  returned as the type's blocks (`kquants.Blocks`).
- `quantize_model` (bottom): a whole model by rtn, gptq or rsq (rotate, importance-weighted
  GPTQ); the single entry point the exporters call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from edgetok.exporters import kquants
from edgetok.exporters.options import CODE_TYPES, METHODS
from edgetok.models.names import LINEARS, LM_HEAD, layer


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # (N, K) uint8 codes in [0, 2^bits)
    scale: torch.Tensor  # (N, K // group_size) float32
    # (N, K // group_size): uint8 codes (symmetric weights have zero = 2^(bits-1)), or float32
    # for fractional zero points (q4_1-style min offsets: x = scale·q + min, zero = -min/scale)
    zero: torch.Tensor
    bits: int
    group_size: int  # == K: one scale per output channel

    def __post_init__(self) -> None:
        n, k = self.q.shape
        assert k % self.group_size == 0, (k, self.group_size)
        assert self.scale.shape == self.zero.shape == (n, k // self.group_size), (self.scale.shape, self.zero.shape)

    @property
    def integer_zero(self) -> bool:
        return not self.zero.is_floating_point()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def symmetric(self) -> bool:
        return bool((self.zero == 1 << (self.bits - 1)).all())

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32."""
        n, k = self.q.shape
        g = self.q.view(n, k // self.group_size, self.group_size).float()
        w = (g - self.zero.float()[..., None]) * self.scale[..., None]
        return w.reshape(n, k)

    def rows(self, index: torch.Tensor | slice) -> QuantizedWeight:
        """The output rows `index` (a slice or a permutation): codes, scales and zeros move together."""
        return QuantizedWeight(self.q[index], self.scale[index], self.zero[index], self.bits, self.group_size)

    def widened(self, bits: int, group_size: int) -> QuantizedWeight:
        """The same values on a grid with more bits (the codes unchanged) and smaller groups (each
        group's scale and zero repeated): lossless, so parts of different grids can share one."""
        assert bits >= self.bits and self.group_size % group_size == 0, (bits, group_size, self)
        repeat = self.group_size // group_size
        return QuantizedWeight(self.q, self.scale.repeat_interleave(repeat, 1), self.zero.repeat_interleave(repeat, 1),
                               bits, group_size)

    @staticmethod
    def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Row blocks stacked on their common grid (the most bits, the smallest groups)."""
        bits, group = max(p.bits for p in parts), min(p.group_size for p in parts)
        parts = [p.widened(bits, group) for p in parts]
        if any(p.integer_zero for p in parts) and not all(p.integer_zero for p in parts):
            parts = [QuantizedWeight(p.q, p.scale, p.zero.float(), bits, group) for p in parts]
        cat = lambda attr: torch.cat([getattr(p, attr) for p in parts])  # noqa: E731
        return QuantizedWeight(cat("q"), cat("scale"), cat("zero"), bits, group)


# -- the grid: one (scale, zero) per row and group ------------------------------------------------
def fit_group_size(k: int, group_size: int) -> int:
    """`group_size` when it divides the input width K, else the largest power of two below it that
    does (SmolLM2's K = 576 takes no group of 128: its q/k/v/o/gate/up get 64)."""
    if k % group_size == 0:
        return group_size
    g = 1 << (group_size.bit_length() - 1)
    while g > 1 and k % g:
        g //= 2
    if g < 16:
        raise ValueError(f"no group size of at least 16 up to {group_size} divides the input width {k}")
    return g


def _round_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scales as the artifact stores them (fp16 in GGUF blocks), so the codes are chosen on the grid
    the runtime will use; kept ≥ the dtype's smallest positive value in magnitude (no division by
    zero; a signed scale keeps its sign)."""
    if scale_dtype == torch.float32:
        return scale
    tiny = torch.finfo(scale_dtype).smallest_normal
    sign = torch.where(scale < 0, -1.0, 1.0)
    return (sign * scale.abs().clamp_min(tiny)).to(scale_dtype).float()


def grid(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float32, float_zero: bool = False,
         signed_scale: bool = False):
    """w (..., G) → scale, zero (...): asymmetric min/max with 0 representable, or ±absmax
    spanning all 2^bits levels around zero = 2^(bits-1) (as GPTQ's quantizer does).

    float_zero: asymmetric groups keep their exact min as a fractional zero point (float32), so
    min and max are both on the grid (q4_1's min offsets; ONNX Runtime's MatMulNBits takes them).
    signed_scale (symmetric): llama.cpp's q4_0 / q5_0 grid — scale = the group's largest-magnitude
    weight ÷ −2^(bits−1), negative when that weight is positive: it sits exactly on code 0 and the
    other side reaches 2^(bits−1)−1 steps, all 2^bits levels used and nothing clipped on the large
    side (the ±absmax grid above clips its largest positive weight by half a step).
    """
    levels = (1 << bits) - 1
    w = w.float()
    if signed_scale:
        assert symmetric and bits < 8, "llama.cpp's signed scales are q4_0's and q5_0's (symmetric, under 8 bits)"
        extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True))[..., 0]
        scale = _round_scale(extreme / -(1 << (bits - 1)), scale_dtype)
        scale = torch.where(scale == 0, torch.full_like(scale, 1e-12), scale)
        zero = torch.full_like(scale, 1 << (bits - 1), dtype=torch.uint8)
    elif symmetric:
        # int8: ±absmax at ±127, as q8_0 (and ONNX Runtime's quantizer) do; fewer bits: ±absmax
        # spans all levels (GPTQ)
        top = 127 if bits == 8 else levels / 2
        scale = _round_scale((w.abs().amax(-1) / top).clamp_min(1e-12), scale_dtype)
        zero = torch.full_like(scale, 1 << (bits - 1), dtype=torch.uint8)
    elif float_zero:
        lo, hi = w.amin(-1), w.amax(-1)
        scale = _round_scale(((hi - lo) / levels).clamp_min(1e-12), scale_dtype)
        zero = -lo / scale
    else:
        lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)  # keep 0 representable
        scale = _round_scale(((hi - lo) / levels).clamp_min(1e-12), scale_dtype)
        zero = (-lo / scale).round().clamp(0, levels).to(torch.uint8)
    return scale, zero


BITS = (2, 3, 4, 5, 8)  # of the codes rtn and gptq choose (5: q5_0's)


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w, scale, zero broadcastable → uint8 codes."""
    return (w / scale + zero.float()).round().clamp(0, (1 << bits) - 1).to(torch.uint8)


def rtn(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, scale_dtype: torch.dtype = torch.float32,
    float_zero: bool = False, signed_scale: bool = False,
) -> QuantizedWeight:
    """Round to nearest: per group, asymmetric min/max (or symmetric absmax) scaling. w: (N, K)."""
    assert bits in BITS, bits
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {k}")
    g = w.float().reshape(n, k // group_size, group_size)
    scale, zero = grid(g, bits, symmetric, scale_dtype, float_zero, signed_scale)
    q = _codes(g, scale[..., None], zero[..., None], bits)
    return QuantizedWeight(q.reshape(n, k), scale.float(), zero, bits, group_size)


# -- GPTQ -----------------------------------------------------------------------------------------
@contextmanager
def _one_thread():
    """GPTQ's column loop is thousands of small ops: with several threads each op pays a thread
    barrier, and on a busy machine that costs >10x (SmolLM2, 2 shared cores: 444 s → 22 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Rounding(Protocol):
    """How GPTQ rounds one column onto a grid."""

    def column(self, col: int, x: torch.Tensor, ahead: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Column `col` (in the matrix's own order) as updated so far, x (N,) → its codes and the
        values they stand for. ahead(): the columns from this one on, as updated so far (N, ·)."""


class _GroupGrids:
    """GPTQ's own grid (`grid`): each group's scale and zero fitted when the group's first column
    comes up, from the weights as updated by the errors of earlier columns (the reference's
    default; unlike the reference, groups that start inside a block see that block's updates too),
    or, static, up front from the weights before any update (with act_order a group's columns are
    no longer rounded together: the reference's static_groups)."""

    def __init__(self, w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype,
                 signed_scale: bool, static: bool) -> None:
        self.bits, self.group_size, self.static = bits, group_size, static
        self.fit = partial(grid, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype, signed_scale=signed_scale)
        n, k = w.shape
        if static:
            self.scale, self.zero = self.fit(w.view(n, k // group_size, group_size))
        else:
            self.scale, self.zero = torch.empty(n, k // group_size), torch.empty(n, k // group_size, dtype=torch.uint8)

    def column(self, col: int, x: torch.Tensor, ahead: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        g = col // self.group_size
        if not self.static and col % self.group_size == 0:
            self.scale[:, g], self.zero[:, g] = self.fit(ahead()[:, : self.group_size])
        s, z = self.scale[:, g], self.zero[:, g].float()
        q = _codes(x, s, z, self.bits)
        return q, (q.float() - z) * s


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    signed_scale: bool = False,
) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022) on w (N, K) with hessian (K, K) ∝ Σ xᵀx of the layer's inputs,
    on `rtn`'s grid (`_GroupGrids`: fitted group by group as the columns come up, or up front with
    act_order, columns in order of decreasing H diagonal); the result is a plain QuantizedWeight in
    the original column order."""
    assert bits in BITS, bits
    if w.shape[1] % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {w.shape[1]}")
    with _one_thread():
        fit = partial(_GroupGrids, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype,
                      signed_scale=signed_scale, static=act_order)
        codes, grids = _gptq(w, hessian, fit, percdamp, block_size, act_order)
    return QuantizedWeight(codes, grids.scale.float(), grids.zero, bits, group_size)


def gptq_as(w: torch.Tensor, hessian: torch.Tensor, kind: str, *, percdamp: float = 0.01, block_size: int = 128,
            act_order: bool = False) -> QuantizedWeight | kquants.Blocks:
    """GPTQ's codes for w (N, K) on the grid of GGUF type `kind`, written as that type's blocks as
    they are: q4_0 / q5_0 / q8_0 (CODE_TYPES) on `gptq`'s grid with fp16 scales (q4_0 / q5_0 signed
    as llama.cpp's); the K-quants and iq4_nl on the grid llama.cpp's quantizer would choose
    (kquants.fit, weighted by the Hessian's diagonal — the imatrix of these inputs), fixed before
    any column is rounded: its super-block scales bind every column of the block, so it cannot be
    refitted as the columns come up."""
    if kind in CODE_TYPES:
        bits, group = CODE_TYPES[kind]
        return gptq(w, hessian, bits, group, True, percdamp=percdamp, block_size=block_size, act_order=act_order,
                    scale_dtype=torch.float16, signed_scale=bits < 8)
    if kind not in kquants.TYPES:
        raise ValueError(f"GPTQ has no grid for {kind} (it has {', '.join((*CODE_TYPES, *kquants.TYPES))})")
    importance = hessian.diagonal().float()  # each input's mean x² (times 2): llama.cpp's imatrix values
    with _one_thread():
        codes, fixed = _gptq(w, hessian, lambda W: kquants.fit(W, kind, importance), percdamp, block_size, act_order)
    return fixed.blocks(codes)


def _ahead(W1: torch.Tensor, W: torch.Tensor, i: int, i2: int) -> torch.Tensor:
    """The columns from i of the current block on, as updated so far."""
    return torch.cat([W1[:, i:], W[:, i2:]], 1)


def _gptq(w, hessian, fit: Callable[[torch.Tensor], Rounding], percdamp, block_size, act_order) -> tuple[torch.Tensor, Rounding]:
    """GPTQ's column loop → (codes (N, K) uint8 in the original column order, the grid they are on).

    As the reference implementation: dead inputs (zero diagonal) are zeroed; the diagonal is
    dampened by percdamp · mean(diag); the upper Cholesky factor of H⁻¹ drives column-by-column
    rounding; errors are applied lazily, inside a block of `block_size` columns at once and to
    the columns after it with one matmul per block. fit(W): the grid, from the weights with the
    dead inputs zeroed, before any update."""
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian is {tuple(hessian.shape)}, the weight's input width {k}")
    W = w.float().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    rounding = fit(W)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(percdamp * H.diagonal().mean())
    # Upper Cholesky factor of H⁻¹: row i holds the update of the columns after i (GPTQ's eq. 3
    # without recomputing the inverse after each column).
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    codes = torch.empty(n, k, dtype=torch.uint8)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()  # (N, B) updated in place as columns are rounded
        err = torch.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            x = W1[:, i]
            q, value = rounding.column(int(perm[col]), x, partial(_ahead, W1, W, i, i2))
            codes[:, col] = q
            e = (x - value) / h1[i, i]
            W1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ hinv[i1:i2, i2:]
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes, rounding


def layer_error(w: torch.Tensor, qw: QuantizedWeight, x: torch.Tensor) -> float:
    """‖W Xᵀ − Ŵ Xᵀ‖_F² / ‖W Xᵀ‖_F²: the relative output error on inputs x (T, K)."""
    ref = x.float() @ w.float().T
    return ((ref - x.float() @ qw.dequantize().T).pow(2).sum() / ref.pow(2).sum()).item()


# -- a whole model --------------------------------------------------------------------------------
@dataclass
class QuantizedModel:
    """What the writers consume: the decoder's linears as codes, everything else as float tensors.

    With `rotated` (rsq) the weights are those of the rotated model (norm weights folded, so
    all ones; the head untied from the embedding when the config says so): a writer must take
    `config` and every tensor from here, not from the source.
    """

    config: Any  # ModelConfig of the weights below
    # HF name → codes (decoder linears: on a group grid, or a GGUF type's blocks) or float tensor
    weights: dict[str, QuantizedWeight | kquants.Blocks | torch.Tensor]
    reference: dict[str, torch.Tensor]  # the float model the codes approximate (rotated when rotated)
    method: str
    rotated: bool
    info: dict[str, Any] = field(default_factory=dict)

    def quantized(self) -> dict[str, QuantizedWeight | kquants.Blocks]:
        return {k: v for k, v in self.weights.items() if not isinstance(v, torch.Tensor)}

    def dequantized(self) -> dict[str, torch.Tensor]:
        """A float state dict with the codes' values (fake quantization), for the reference model."""
        return {k: v if isinstance(v, torch.Tensor) else v.dequantize() for k, v in self.weights.items()}


def quantized_source(source, qm: QuantizedModel):
    """`source` (a models.sources.Source) as the float weights and config the codes of `qm`
    approximate (rotated ones for rsq): what a writer builds the artifact from. Parity reports
    still compare with the original source."""
    import dataclasses

    return dataclasses.replace(source, config=qm.config, load_weights=lambda: qm.reference)


def quantize_model(
    source,
    bits: int = 4,
    group_size: int = 32,
    method: str = "rtn",
    calib_text: str | None = None,
    calib_tokens: int | None = None,
    progress: Callable | None = None,
    *,
    symmetric: bool = False,
    act_order: bool = False,
    percdamp: float = 0.01,
    scale_dtype: torch.dtype = torch.float16,
    signed_scale: bool = False,
    gguf_type: Callable[[str, tuple[int, ...]], str] | None = None,
    seq_len: int | None = None,
    r_max: float = 10.0,
    importance: bool = True,
    seed: int = 0,
) -> QuantizedModel:
    """Quantize the decoder linears of `source` (a models.sources.Source) by rtn, gptq or rsq.

    group_size is fitted per linear (`fit_group_size`). Calibration (gptq, rsq) reads
    calib_tokens tokens of calib_text, or of the end of the built-in essays when it is None.
    scale_dtype: the precision the artifact stores scales in (fp16 for GGUF blocks, MatMulNBits
    and QDQ); scales are rounded to it before the codes are chosen. signed_scale: llama.cpp's
    q4_0 grid (`grid`).
    gguf_type (gptq, rsq): a linear's HF name and shape → the GGUF type it is written as (the type
    plan's); its codes are chosen on that type's own grid (`gptq_as`), and bits, group_size,
    symmetric, scale_dtype and signed_scale are not read. A linear whose type has no such grid
    (f16, q4_1, …) stays float, for the writer to round.
    importance: rsq weights tokens by attention received (r_max: the weight range [1, r_max]);
    False leaves only the rotation (an ablation).
    """
    from edgetok.exporters import calibration
    from edgetok.models.llama import LlamaModel

    if method not in METHODS:
        raise ValueError(f"unknown quantization method '{method}' (choose from {', '.join(METHODS)})")
    if gguf_type is not None and method == "rtn":
        raise ValueError("gguf_type chooses gptq / rsq codes; a GGUF's rtn blocks are rounded by its writer")
    cfg = source.config
    weights = {k: v.float() for k, v in source.weights.items()}
    if cfg.tie_word_embeddings:
        weights.pop(LM_HEAD, None)
    rotated = method == "rsq"
    info: dict[str, Any] = {"method": method}
    if gguf_type is None:
        info |= {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    if signed_scale and gguf_type is None:
        info["grid"] = "llama.cpp's q4_0: the largest-magnitude weight ÷ −8 (signed scales)"
    if rotated:
        from edgetok.exporters.rotation import rotate

        untied_before = not cfg.tie_word_embeddings
        weights, cfg = rotate(weights, cfg, seed=seed)
        info["rotation"] = "random Hadamard on the residual stream and on each value head, norms folded"
        info["untied_head"] = not untied_before and not cfg.tie_word_embeddings
    names = [layer(i, f"{lin}.weight") for i in range(cfg.num_layers) for lin in LINEARS]
    kinds = {} if gguf_type is None else {n: gguf_type(n, tuple(weights[n].shape)) for n in names}
    groups = {n: fit_group_size(weights[n].shape[1], group_size) for n in names}
    start = time.perf_counter()
    if method == "rtn":
        codes = {n: rtn(weights[n], bits, groups[n], symmetric, scale_dtype, signed_scale=signed_scale) for n in names}
    else:
        seq_len = seq_len or calibration.SEQ_LEN
        tokens = calibration.calibration_tokens(source.tokenizer, calib_text, calib_tokens or calibration.DEFAULT_TOKENS, seq_len)
        model = LlamaModel.from_state_dict(cfg, {k: v.clone() for k, v in weights.items()})

        def quantize(name: str, w: torch.Tensor, h: torch.Tensor) -> QuantizedWeight | kquants.Blocks | None:
            if kinds:  # a type with no gptq grid (f16, q4_1, …): left float, for the writer to round
                gridded = kinds[name] in CODE_TYPES or kinds[name] in kquants.TYPES
                return gptq_as(w, h, kinds[name], percdamp=percdamp, act_order=act_order) if gridded else None
            g = fit_group_size(w.shape[1], group_size)
            return gptq(w, h, bits, g, symmetric, percdamp=percdamp, act_order=act_order, scale_dtype=scale_dtype,
                        signed_scale=signed_scale)

        weighted = rotated and importance
        codes = calibration.calibrate(model, tokens, quantize, weighted=weighted, r_max=r_max, progress=progress,
                                      grid_of=kinds.get)
        info |= {"calibration_tokens": int(tokens.numel()), "calibration_sequences": int(tokens.shape[0]),
                 "seq_len": seq_len, "act_order": act_order, "percdamp": percdamp,
                 "calibration_text": "built-in essays (end)" if calib_text is None else "user text"}
        info["importance"] = f"AttnCon, sqrt-normalized, range [1, {r_max}]" if weighted else None
    info["seconds"] = round(time.perf_counter() - start, 1)
    if kinds:
        info["grids"] = {kind: sum(kinds[n] == kind for n in codes) for kind in sorted({kinds[n] for n in codes})}
    else:
        info["group_sizes"] = sorted(set(groups.values()))
    out: dict[str, QuantizedWeight | kquants.Blocks | torch.Tensor] = dict(weights)
    out.update(codes)
    return QuantizedModel(cfg, out, weights, method, rotated, info)
