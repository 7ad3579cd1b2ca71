"""Which GGUF type each tensor is written as (the type plan), and a tensor encoded as a type.

A type's blocks run along a tensor's rows (its last axis): a row that is not a whole number of
blocks cannot take the type. K-quant blocks are 256 values, and many small models' rows are not
(SmolLM2's 576, Gemma 3 270M's 640): those tensors fall back, and the plan says to what and why.
llama.cpp's quantizer falls back from q4_k / q5_k / q6_k to q5_0 / q5_1 / q8_0, files a bit larger
than asked for; edgetok falls back to the 32-value type nearest in size: iq4_nl (4.5 bits per
weight, as q4_k), q5_0 (5.5, as q5_k), q8_0 (nothing 6-bit has 32-value blocks).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch

from edgetok.exporters import kquants

FLOAT_TYPES = ("f32", "f16", "bf16")
FALLBACK = {"q4_k": "iq4_nl", "q5_k": "q5_0", "q6_k": "q8_0"}  # the rest (32-value blocks) fall back to f16


def qtype(kind: str):
    """--quant's name → gguf-py's tensor type (its name in capitals)."""
    import gguf

    return gguf.GGMLQuantizationType[kind.upper()]


def block_values(kind: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[qtype(kind)][0]


def bits_per_weight(kind: str) -> float:
    import gguf

    values, size = gguf.GGML_QUANT_SIZES[qtype(kind)]
    return 8 * size / values


@dataclass(frozen=True)
class TensorType:
    """One row of the type plan: a tensor (llama.cpp's name), the type it was to get and the one
    it gets, and why they differ ("" when they do not); kept: written with a GGUF source's own
    blocks (the source stores it at that type)."""

    tensor: str
    asked: str
    type: str
    why: str = ""
    kept: bool = False

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def choose_type(tensor: str, shape: tuple[int, ...], asked: str) -> TensorType:
    """The type tensor `tensor` of `shape` is written as, asked for `asked`."""
    if len(shape) == 1:
        why = "" if asked == "f32" else "1-D (a norm or bias): f32, as llama.cpp keeps them"
        return TensorType(tensor, asked, "f32", why)
    kind, reasons = asked, []
    while kind not in FLOAT_TYPES and shape[-1] % block_values(kind):
        fallback = FALLBACK.get(kind, "f16")
        reasons.append(f"rows of {shape[-1]} values are not whole {block_values(kind)}-value blocks of {kind}")
        kind = fallback
    if reasons:
        reasons[-1] += f": {kind}, {bits_per_weight(kind):g} bits per weight"
    return TensorType(tensor, asked, kind, "; ".join(reasons))


def encode(w: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> tuple[np.ndarray, object]:
    """w (rows already in llama.cpp's order) as `kind` → (array GGUFWriter writes, its GGML type).
    importance (K,): an imatrix's values, weighting the K-quants' and iq4_nl's rounding (the other
    types are rounded by gguf-py, which takes none)."""
    from gguf.quants import quantize

    if kind == "f32":
        return w.float().numpy(), qtype(kind)
    if kind in kquants.TYPES:
        return kquants.quantize_rows(w.reshape(-1, w.shape[-1]), kind, importance=importance), qtype(kind)
    return quantize(w.float().numpy(), qtype(kind)), qtype(kind)


def round_trip(w: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """w after encoding as `kind` and decoding (what llama.cpp computes with)."""
    from gguf.quants import dequantize

    data, gtype = encode(w, kind, importance)
    return torch.from_numpy(np.array(dequantize(data, gtype), dtype=np.float32).reshape(w.shape))


# llama.cpp's CPU matmul multiplies a stored type by its input rounded to the type's partner
# (ggml-cpu's vec_dot_type): 8-bit codes in blocks of 32 with an f16 scale (q8_0; q8_1 adds the
# block's sum, for the types with a minimum), in blocks of 256 with a float scale (q8_K, the
# K-quants'), or the input as f16 / bf16; f32 takes it as it is. The partner's rounding is part of
# what a type costs: a K-quant's 256-value blocks of a GeGLU's heavy-tailed output round it
# coarsely (Gemma 3's ffn_down at its own q4_k / q6_k doubled the file's KL against q8_0).
INPUT_PARTNER = {"q4_0": "q8_0", "q5_0": "q8_0", "q8_0": "q8_0", "iq4_nl": "q8_0", "q4_1": "q8_1", "q5_1": "q8_1",
                 "q4_k": "q8_k", "q5_k": "q8_k", "q6_k": "q8_k", "f16": "f16", "bf16": "bf16"}
INPUT_BLOCK = {"q8_0": 32, "q8_1": 32, "q8_k": 256}


def input_rounding(kind: str):
    """How llama.cpp rounds the input of a matrix stored as `kind` (None: it does not)."""
    partner = INPUT_PARTNER.get(kind)
    if partner is None:
        return None
    if partner in ("f16", "bf16"):
        dtype = torch.float16 if partner == "f16" else torch.bfloat16
        return lambda x: x.to(dtype).to(x.dtype)
    block, scale = INPUT_BLOCK[partner], torch.float32 if partner == "q8_k" else torch.float16
    return lambda x: round_to_int8_blocks(x, block, scale)


def round_to_int8_blocks(x: torch.Tensor, block: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """x's last axis in blocks of `block`, each as 8-bit codes times the block's largest magnitude
    / 127 (stored as `scale_dtype`), as ggml's quantize_row_q8_0 / _q8_K round it."""
    blocks = x.float().reshape(-1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inverse)
    return (codes * (amax / 127).to(scale_dtype).float()).reshape(x.shape).to(x.dtype)


def plan_summary(plan: list[TensorType]) -> list[str]:
    """Lines for people: the count of each type, then each kind of fallback with a few tensors."""
    counts = Counter(t.type for t in plan)
    lines = ["tensor types: " + ", ".join(f"{n} {kind}" for kind, n in counts.most_common())]
    groups: dict[tuple[str, str, str], list[str]] = {}
    for t in plan:
        if t.why and not t.why.startswith("1-D"):
            groups.setdefault((t.asked, t.type, t.why), []).append(t.tensor)
    for (asked, kind, why), tensors in groups.items():
        shown = ", ".join(tensors[:3]) + (", …" if len(tensors) > 3 else "")
        lines.append(f"  {kind} instead of {asked} for {len(tensors)} tensors ({why}): {shown}")
    kept = sum(t.kept for t in plan)
    if kept:
        lines.append(f"  {kept} tensors keep the source's own blocks (already at their type: no rounding)")
    return lines
