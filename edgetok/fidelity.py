"""Fidelity in every report: each lossy knob a run uses, and its estimated effect.

A run's `--json` (Stats.fidelity) names, for the weights, the KV cache's budget, the KV cache's
bits and prompt pruning, what was lost and the best estimate edgetok has of what it cost:

- weights: the artifact's parity report (KL and top-1 agreement against the fp32 reference,
  measured at export and kept in its manifest), or what was done to them with no measurement;
- kv_budget: the share of the context attention read and the attention mass it captured
  (measured at sampled steps in RAM; the selection's own estimate in tiers);
- kv_bits: the bit width chunks are stored at (llama.cpp: its cache type);
- pruning: the share of the prompt's tokens the later layers kept.

An exact knob says so ("exact": true). Values come from what the run measured (kv/fidelity.py,
the engine's Stats) and from the manifests; nothing is re-measured here.
"""

from __future__ import annotations

from typing import Any

from edgetok.errors import EdgetokError
from edgetok.models.manifest import GgufManifest, gguf_report_path


def weights_effect(source: Any, runtime_weights: str) -> dict:
    """What the weights a backend runs cost against the fp32 model. source: a models.sources.Source;
    runtime_weights: the torch backend's --weights (an ONNX export or llama.cpp: "as stored")."""
    out: dict = {"format": source.format}
    parity = None
    if source.format == "onnx" and source.manifest is not None:
        out["stored"] = source.manifest.weights
        parity = source.manifest.parity
    elif source.format == "optimum":  # (no manifest: no parity report)
        out["stored"] = "as optimum exported them"
    elif source.format == "gguf":
        types = source.info.get("tensor_types", {})  # GGUF tensor type → count
        out["stored"] = ", ".join(f"{t} ×{n}" for t, n in sorted(types.items(), key=lambda x: -x[1])) or "gguf"
        report = gguf_report_path(source.path)
        if report.is_file():
            try:
                parity = GgufManifest.read(report).parity
            except EdgetokError:
                parity = None
    else:
        out["stored"] = "fp32"
    out["runtime"] = runtime_weights
    if parity is not None:
        out["parity"] = {"kl_mean": parity.kl_mean, "top1_agreement": parity.top1_agreement,
                         "perplexity_change": round(parity.perplexity / parity.perplexity_reference - 1, 4),
                         "tokens": parity.tokens, "reference": parity.reference}
    elif out["stored"] == "fp32" and runtime_weights == "fp32":
        out["exact"] = True
    else:
        out["parity"] = None  # no parity report: a published file, or an export made with --no-verify
    return out


def run_fidelity(weights: dict, kv: dict, prune: dict, prompt_tokens: int) -> dict:
    """The fidelity section of a run's stats: weights (weights_effect), the cache's stats() and the
    pruning record as the engine filled them."""
    out: dict = {"weights": weights}
    kind = kv.get("kind", "")
    if kind.startswith("llama.cpp"):
        out["kv_bits"] = {"type": kind.removeprefix("llama.cpp (").removesuffix(")"), "exact": "f16" in kind}
        out["kv_budget"] = {"exact": True}
    elif kind == "contiguous":
        out["kv_budget"] = {"exact": True}
        out["kv_bits"] = {"exact": True}
    elif kv:
        budget = {"budget": kv["budget"], "budget_used": kv["budget_used"]}
        if kv.get("coverage") is not None:
            budget["coverage_target"] = kv["coverage"]
        if "captured_mass" in kv:
            budget["captured_mass"] = kv["captured_mass"]  # measured at sampled steps
        elif "coverage_estimated" in kv:
            budget["captured_mass_estimated"] = kv["coverage_estimated"]  # by the selection's own scores
        if "scoring" in kv:
            budget["scoring"] = kv["scoring"]
        budget["exact"] = kv["budget"] == "100%"
        out["kv_budget"] = budget
        bits = kv["storage_bits"]
        out["kv_bits"] = {"stored": bits, "exact": bits == "32"}
        if bits != "32":
            out["kv_bits"]["attention_reads"] = "bf16"
    if prune:
        out["pruning"] = {"kept_fraction": round(prune["kept_tokens"] / max(prompt_tokens, 1), 4),
                          "after_layer": prune["after_layer"]}
    else:
        out["pruning"] = {"exact": True}
    return out
