"""What a budgeted cache's selection cost: per layer, the budget it chose and the attention it held.

Every decode step counts, per layer, the tokens attention read and the tokens there were (the
budget actually used) and, under --kv-budget auto, the coverage the chunks' bounds promised. Every
MASS_EVERY-th step (the first one too) a cache whose tokens are all in RAM also measures the
captured attention mass exactly: the share of the full softmax that the tokens read hold, with the
step's own query, against every key of the layer (kernels/selection.captured_mass). Tiers do not
measure it: reading every chunk back from host or disk would cost what the budget saves.
"""

from __future__ import annotations

import numpy as np
import torch

MASS_EVERY = 16  # decode steps between exact measurements (one costs about a full-attention step)


class Fidelity:
    def __init__(self, num_layers: int) -> None:
        self.n = num_layers
        self.clear()

    def clear(self) -> None:
        self.attended = [0.0] * self.n  # tokens read, summed over steps
        self.total = [0.0] * self.n  # tokens there were, summed over steps
        self.pseudo = [0.0] * self.n  # chunk summaries folded in (one pseudo-token per unread chunk), summed over steps
        self.estimated: list[list[float]] = [[] for _ in range(self.n)]  # auto: promised coverage per step
        self.mass: list[list[float]] = [[] for _ in range(self.n)]  # measured, mean over heads, per sample
        self.mass_min: list[float] = []  # the least-covered head of each sampled layer-step

    @staticmethod
    def sampled(step: int) -> bool:
        """Whether decode step `step` (1, 2, …) measures the captured mass."""
        return (step - 1) % MASS_EVERY == 0

    def count(self, layer: int, attended: int, total: int) -> None:
        self.attended[layer] += attended
        self.total[layer] += total

    def summarized(self, layer: int, chunks: int) -> None:
        """This step, layer `layer` added `chunks` unread chunks as their summaries."""
        self.pseudo[layer] += chunks

    def promise(self, layer: int, estimated: torch.Tensor | float) -> None:
        """estimated (a float or a 0-d tensor): the coverage of the layer's selection by its chunks' bounds, this step
        (calibrated by the fitted temperature under --kv-budget auto; at temperature 1 otherwise)."""
        self.estimated[layer].append(float(estimated))

    def measured(self, layer: int, per_head: torch.Tensor | np.ndarray) -> None:
        """per_head (Hq,): the captured mass of each query head this step."""
        self.mass[layer].append(float(per_head.mean()))
        self.mass_min.append(float(per_head.min()))

    def report(self) -> dict:
        budgets = [round(a / t, 4) if t else 1.0 for a, t in zip(self.attended, self.total)]
        samples = [m for layer in self.mass for m in layer]
        out = {"budget_per_layer": budgets}
        if any(self.pseudo):  # what the summaries cost, in the same unit: pseudo-tokens / tokens there were
            out["summaries_read"] = round(sum(self.pseudo) / max(sum(self.total), 1), 4)
        if any(self.estimated):
            out["coverage_estimated"] = round(_mean([e for layer in self.estimated for e in layer]), 4)
        if samples:
            out |= {
                "captured_mass": round(_mean(samples), 4),  # mean over layers, heads, sampled steps
                "captured_mass_min_head": round(min(self.mass_min), 4),
                "captured_mass_per_layer": [round(_mean(m), 4) if m else None for m in self.mass],
                "captured_mass_samples": len(samples),
            }
        return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
