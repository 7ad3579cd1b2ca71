"""Which engine runs a model when the user names none, and why: `--verbose` and `--json` say it.

With no engine options, a model that is not an ONNX export runs on its default export (int4
weights, float activations, ONNX Runtime: exporters/default.py), and prompts longer than the
plan's exact limit get the tiered KV cache at the plan's budget (devices/planner.py); short
prompts stay exact. An option only one backend has (--weights, --kv-type) picks that backend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgetok.runtimes.backends.base import PRUNE
from edgetok.runtimes.kv import KVConfig

TORCH_WEIGHTS = ("fp32", "bf16", "int8")  # the torch backend's --weights (named here: no torch to import)


@dataclass(frozen=True)
class LongPrompts:
    """Prompts of more than `above` tokens get the tiered cache `kv`; shorter ones stay exact."""

    above: int
    kv: KVConfig

    def describe(self) -> str:
        return f"exact up to {self.above} prompt tokens, tiered at a {self.kv.budget} budget above"


@dataclass(frozen=True)
class EngineChoice:
    backend: str  # torch | onnxruntime | llamacpp
    weights: str  # what the backend multiplies with, in words
    kv: str  # the KV policy, in words
    threads: int
    reasons: list[str] = field(default_factory=list)  # why, one sentence each
    artifact: str | None = None  # the export that runs, when edgetok built it

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """For --verbose: what runs, then why."""
        head = f"engine: {self.backend}, {self.weights}, KV {self.kv}, {self.threads} threads"
        return [head] + [f"  because {r}" for r in self.reasons] + ([f"  export: {self.artifact}"] if self.artifact else [])


def auto_backend(source_format: str, weights: str, kv_type: str | None, needs: frozenset[str]) -> tuple[str, str]:
    """(backend, why) when the user named none; needs: capabilities the run uses (backends/base.py)."""
    if source_format == "onnx":
        return "onnxruntime", "an ONNX export runs on ONNX Runtime"
    if PRUNE in needs:
        return "torch", ("prompt pruning runs on the torch backend here: the default export has no pruning point "
                         "(it decodes ~10% faster without; export with --prune-after-layer for a fast pruning engine)")
    if kv_type is not None:
        return "llamacpp", f"--kv-type {kv_type} sets llama.cpp's cache"
    if weights != "fp32":
        return "torch", f"--weights {weights} is a precision of the torch backend"
    return "onnxruntime", ("no engine was named: the default is the model's int4 ONNX export with float activations "
                           "(built once; on SmolLM2 it keeps the fp32 reference's next tokens at ~3× its decode speed)")
