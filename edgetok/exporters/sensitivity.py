"""What rounding each weight matrix costs the model, measured: KL(fp32 ‖ the model with only that
matrix rounded) on real text. --keep-sensitive (exporters/gguf.py) and the bit-budget allocator
(exporters/allocate.py) read it; both formats say how a type rounds a matrix (a `RoundTrip`) and
how their runtime rounds what it multiplies that matrix by (an `InputRounding`: llama.cpp rounds a
quantized matrix's input to 8-bit blocks, whose size depends on the matrix's type).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edgetok.models.sources import Source

# (HF tensor name, its float weight, a type of the artifact) → the weight as the artifact's runtime
# computes with it
RoundTrip = Callable[[str, torch.Tensor, str], torch.Tensor]
# a type of the artifact → how its runtime rounds the input of a matrix stored at that type, before
# multiplying (None: it multiplies the input as it is)
InputRounding = Callable[[str], Callable[[torch.Tensor], torch.Tensor] | None]


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


@dataclass
class Mix:
    """Matrices as an artifact's runtime computes with them: HF tensor → its rounded weight, and
    the type it is stored at (which says how the runtime rounds the tensor's input)."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def __or__(self, other: Mix) -> Mix:
        return Mix(self.weights | other.weights, self.kinds | other.kinds)


class Rounded:
    """The fp32 reference model on `tokens`, whose matrices can be swapped for rounded ones: the
    KL of any mix against the unrounded model's logits (computed once). `inputs`: how the
    artifact's runtime rounds each type's inputs (none given: not at all)."""

    def __init__(self, source: Source, tokens: list[int], inputs: InputRounding | None = None) -> None:
        from edgetok.exporters.verify import model_logits
        from edgetok.models.llama import LlamaModel

        self.tokens = tokens
        self.inputs = inputs
        self.model = LlamaModel.from_state_dict(source.config, source.weights)
        # a tied embedding is one parameter under both names: rounding one rounds the head too
        self.params = dict(self.model.named_parameters(remove_duplicate=False))
        # the products each parameter is in (a tied embedding's: the head's; a lookup rounds no input)
        self.linears: dict[int, list[torch.nn.Linear]] = {}
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear):
                self.linears.setdefault(id(module.weight), []).append(module)
        self.reference = model_logits(self.model, tokens)

    def on(self, tokens: list[int]) -> Rounded:
        """The same model (its matrices shared) on other tokens, with their own reference logits."""
        from edgetok.exporters.verify import model_logits

        other = copy.copy(self)
        other.tokens, other.reference = tokens, model_logits(self.model, tokens)
        return other

    def weight(self, name: str) -> torch.Tensor:
        return self.params[name].data

    def kl(self, mix: Mix) -> float:
        """Mean KL(reference ‖ the model computing with `mix`) over the tokens."""
        from edgetok.exporters.verify import compare

        return compare(self.reference, self.logits(mix), self.tokens).kl_mean

    def logits(self, mix: Mix) -> torch.Tensor:
        """The model's logits on the tokens, computing with `mix` (the model is left as it was)."""
        from edgetok.exporters.verify import model_logits

        originals = {name: self.params[name].data for name in mix.weights}
        hooks = []
        try:
            for name, w in mix.weights.items():
                self.params[name].data = w
            for name, kind in mix.kinds.items():
                rounding = self.inputs(kind) if self.inputs else None
                if rounding is not None:
                    hooks += [linear.register_forward_pre_hook(lambda _, args, f=rounding: (f(args[0]),))
                              for linear in self.linears.get(id(self.params[name]), ())]
            return model_logits(self.model, self.tokens)
        finally:
            for hook in hooks:
                hook.remove()
            for name, w in originals.items():
                self.params[name].data = w

    def rounded(self, matrix: Matrix, kind: str, round_trip: RoundTrip) -> Mix:
        return Mix({p: round_trip(p, self.weight(p), kind) for p in matrix.parts}, dict.fromkeys(matrix.parts, kind))


def tensor_kl(rounded: Rounded, matrices: list[Matrix], round_trip: RoundTrip, progress=None) -> dict[str, dict[str, float]]:
    """matrix name → type → KL of the model with only that matrix at that type."""
    trials = [(m, kind) for m in matrices for kind in m.types]
    result: dict[str, dict[str, float]] = {m.name: {} for m in matrices}
    for m, kind in progress(trials, len(trials)) if progress else trials:
        result[m.name][kind] = rounded.kl(rounded.rounded(m, kind, round_trip))
    return result
