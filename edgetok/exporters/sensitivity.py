"""What rounding each weight matrix costs the model, measured: KL(fp32 ‖ the model with only that
matrix rounded) on real text. --keep-sensitive (exporters/gguf.py) and the bit-budget allocator
(exporters/allocate.py) read it; both formats say how a type rounds a matrix (a `RoundTrip`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgetok.models.sources import Source

# (HF tensor name, its float weight, a type of the artifact) → the weight as the artifact's runtime
# computes with it
RoundTrip = Callable[[str, torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class Matrix:
    """One weight matrix as an artifact writes it: its name there (a fused ONNX linear stacks
    several HF tensors' rows), its weight count, and the types it can take (cheapest first)."""

    name: str
    parts: tuple[str, ...]  # HF names
    size: int  # weights
    types: tuple[str, ...]

    def __post_init__(self) -> None:
        assert self.parts and self.types and self.size > 0, self


class Rounded:
    """The fp32 reference model on `tokens`, whose matrices can be swapped for rounded ones: the
    KL of any mix against the unrounded model's logits (computed once)."""

    def __init__(self, source: Source, tokens: list[int]) -> None:
        from edgetok.exporters.verify import model_logits
        from edgetok.models.llama import LlamaModel

        self.tokens = tokens
        self.model = LlamaModel.from_state_dict(source.config, source.weights)
        # a tied embedding is one parameter under both names: rounding one rounds the head too
        self.params = dict(self.model.named_parameters(remove_duplicate=False))
        self.reference = model_logits(self.model, tokens)

    def weight(self, name: str) -> torch.Tensor:
        return self.params[name].data

    def kl(self, replaced: dict[str, torch.Tensor]) -> float:
        """Mean KL(reference ‖ the model with the HF tensors `replaced`) over the tokens."""
        from edgetok.exporters.verify import compare, model_logits

        originals = {name: self.params[name].data for name in replaced}
        try:
            for name, w in replaced.items():
                self.params[name].data = w
            return compare(self.reference, model_logits(self.model, self.tokens), self.tokens).kl_mean
        finally:
            for name, w in originals.items():
                self.params[name].data = w

    def rounded(self, matrix: Matrix, kind: str, round_trip: RoundTrip) -> dict[str, torch.Tensor]:
        return {p: round_trip(p, self.weight(p), kind) for p in matrix.parts}


def tensor_kl(rounded: Rounded, matrices: list[Matrix], round_trip: RoundTrip, progress=None) -> dict[str, dict[str, float]]:
    """matrix name → type → KL of the model with only that matrix at that type."""
    trials = [(m, kind) for m in matrices for kind in m.types]
    result: dict[str, dict[str, float]] = {m.name: {} for m in matrices}
    for m, kind in progress(trials, len(trials)) if progress else trials:
        result[m.name][kind] = rounded.kl(rounded.rounded(m, kind, round_trip))
    return result
