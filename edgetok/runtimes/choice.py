"""Which engine runs a model when the user names none, and why: `--verbose` and `--json` say it.

With no engine options, a model that is not an ONNX export runs on its default export (int4
weights, float activations, ONNX Runtime: exporters/default.py), and prompts longer than the
plan's exact limit get the tiered KV cache at the plan's budget (devices/planner.py); short
prompts stay exact. An option only one backend has (--weights, --kv-type) picks that backend.

`--plan auto|FILE` (`edgetok run`'s default: auto) sets that engine's execution provider, threads
and long-prompt KV cache (budget, bits, tiers) from the plan for this machine (`local`) or from a
plan saved by `edgetok plan --json`; an option the user gives overrides the plan's.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgetok.errors import EdgetokError
from edgetok.kernels import ort_ops
from edgetok.models.sources import ONNX_FORMATS
from edgetok.runtimes.backends.base import CACHE_ATTENTION, PRUNE
from edgetok.runtimes.kv import KVConfig

TORCH_WEIGHTS = ("fp32", "bf16", "int8")  # the torch backend's --weights (named here: no torch to import)

if TYPE_CHECKING:
    from edgetok.devices.planner import Plan
    from edgetok.models.config import ModelConfig

AUTO_PLAN = "auto"
# `--plan auto` measures this machine's disk and memory on small probes: the plan's choices need its
# free memory; the speeds only feed the predictions --verbose prints (`edgetok plan` measures on 64 MB)
AUTO_PROBE_MB = 16


@dataclass(frozen=True)
class LongPrompts:
    """Prompts of more than `above` tokens get the tiered cache `kv`; shorter ones stay exact."""

    above: int
    kv: KVConfig

    def describe(self) -> str:
        tiers = "" if self.kv.device_mb is None else (
            f" over device {self.kv.device_mb:g} MB / host {self.kv.host_mb:g} MB / disk {self.kv.disk_dir}")
        if self.above == 0:
            return f"tiered at a {self.kv.budget} budget{tiers}"
        return f"exact up to {self.above} prompt tokens, tiered at a {self.kv.budget} budget{tiers} above"


@dataclass(frozen=True)
class EngineChoice:
    backend: str  # torch | onnxruntime | llamacpp
    weights: str  # what the backend multiplies with, in words
    kv: str  # the KV policy, in words
    threads: int
    reasons: list[str] = field(default_factory=list)  # why, one sentence each
    artifact: str | None = None  # the export that runs, when edgetok built it
    plan: dict | None = None  # the plan applied (Plan.to_dict()), when one was

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """For --verbose: what runs, then why."""
        head = f"engine: {self.backend}, {self.weights}, KV {self.kv}, {self.threads} threads"
        planned = []
        if self.plan is not None:
            p = self.plan
            planned = [f"  plan: {p['device']} at {p['context']} tokens, predicted peak "
                       f"{p['predicted_peak_host_bytes'] / (1 << 20):.0f} MB (host), decode "
                       f"{p['predicted_decode_tokens_per_s']:g} tok/s"] + [f"    · {line}" for line in p["arithmetic"]]
        return ([head] + [f"  because {r}" for r in self.reasons] + planned
                + ([f"  export: {self.artifact}"] if self.artifact else []))


@dataclass(frozen=True)
class Planned:
    """What a plan sets for a run whose engine edgetok chose: the user's own options win."""

    plan: Plan
    provider: str
    threads: int
    long_prompts: LongPrompts | None  # None: every prompt exact
    reason: str


def follow_plan(plan: str | Plan, cfg: ModelConfig, provider: str | None, threads: int | None,
                kv_given: bool) -> Planned:
    """plan: "auto" (plan for this machine now), a saved plan's path, or a Plan; the options the
    user gave (provider, threads, kv_given) stay theirs."""
    from edgetok.devices.catalog import local_profile
    from edgetok.devices.planner import EXACT_UP_TO, Plan, load_plan
    from edgetok.devices.planner import plan as make_plan

    disk = Path(tempfile.gettempdir())  # where the local profile measured the disk, and the tier goes
    if isinstance(plan, Plan):
        chosen, origin = plan, "the plan given"
    elif plan == AUTO_PLAN:
        # (the engine edgetok picks runs on ONNX Runtime: torch is not asked for accelerators, nor imported)
        chosen = make_plan(cfg, local_profile(disk, probe_mb=AUTO_PROBE_MB, accelerators=False), None, threads or _cores())
        origin = "--plan auto (this machine, measured now)"
    elif isinstance(plan, str | Path):
        chosen, origin = load_plan(Path(plan)), f"--plan {plan}"
    else:
        raise EdgetokError(f"plan must be 'auto', a saved plan's path or an edgetok Plan, not {type(plan).__name__}")
    if chosen.context > cfg.max_context:
        raise EdgetokError(f"{origin} plans for {chosen.context} tokens of context, beyond the model's {cfg.max_context}; "
                           f"make a plan for this model with `edgetok plan MODEL --context N`")
    kv = None if kv_given else chosen.kv_config(disk)
    if kv is not None and kv.disk_dir is not None and not (disk.is_dir() and os.access(disk, os.W_OK | os.X_OK)):
        raise EdgetokError(f"the plan puts KV chunks on disk in {disk}, which is not a writable folder; "
                           f"set TMPDIR to one, or give --kv-disk DIR with the plan's other KV options")
    # Short prompts stay exact, unless the plan needed tiers at a context that short (memory is short)
    above = EXACT_UP_TO if chosen.context > EXACT_UP_TO or chosen.kv_device_mb is None else 0
    set_ = [what for what, mine in (("provider", provider), ("threads", threads)) if mine is None]
    set_ += [] if kv_given else ["KV cache"]
    return Planned(
        plan=chosen, provider=provider or chosen.execution_provider, threads=threads or chosen.threads,
        long_prompts=None if kv is None else LongPrompts(above, kv),
        reason=(f"{origin} for {chosen.device} at {chosen.context} tokens set the "
                f"{', '.join(set_) if set_ else 'nothing: every option it sets was given'}"
                + (f" (budget {chosen.kv_budget}, bits {chosen.kv_bits}"
                   + (f", tiers device {chosen.kv_device_mb:g} MB / host {chosen.kv_host_mb:g} MB / disk {disk}"
                      if chosen.kv_device_mb is not None else "") + ")" if kv is not None else "")))


def _cores() -> int:
    return os.cpu_count() or 1


def auto_backend(source_format: str, weights: str, kv_type: str | None, needs: frozenset[str]) -> tuple[str, str]:
    """(backend, why) when the user named none; needs: capabilities the run uses (backends/base.py)."""
    if source_format in ONNX_FORMATS:
        return "onnxruntime", "an ONNX export runs on ONNX Runtime"
    if PRUNE in needs:
        return "torch", ("prompt pruning runs on the torch backend here: the default export has no pruning point "
                         "(it decodes ~10% faster without; export with --prune-after-layer for a fast pruning engine)")
    if CACHE_ATTENTION in needs and not ort_ops.attention_available():
        return "torch", ("per-head chunk selection and chunk summaries (--kv-selection head, --kv-summaries on) run "
                         "on the torch backend here: the default export hands each layer's attention to the cache "
                         "through edgetok's attention operator, which needs a CPU with AVX2 and FMA")
    if kv_type is not None:
        return "llamacpp", f"--kv-type {kv_type} sets llama.cpp's cache"
    if weights != "fp32":
        return "torch", f"--weights {weights} is a precision of the torch backend"
    return "onnxruntime", ("no engine was named: the default is the model's ONNX export — a GGUF's own codes "
                           "(--weights source), a float model's at int4 — with float activations (built once; it "
                           "keeps the fp32 reference's next tokens at ~3× its decode speed)")
