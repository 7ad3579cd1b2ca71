"""KVConfig: how much of the context attention reads, and where the KV cache lives."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from edgetok.errors import EdgetokError

BITS_CHOICES = ("auto", "32", "16", "8", "4", "2")
DEFAULT_COVERAGE = 0.95  # --kv-budget auto's target: see BENCHMARKS.md, "Token scores" (issue 21)
SUMMARIES_CHOICES = ("on", "off")
SELECTION_CHOICES = ("layer", "head")
SCORING_CHOICES = ("tokens", "bounds")
PREFETCH_CHOICES = ("auto", "on", "off")
# --kv-budget auto under token scores: every layer reads at least its share (policy.layer_shares)
# of this much of the context, and more where the scores say its coverage target needs it (a
# coverage target alone spent the budget on the near-uniform first layers and starved the rest:
# BENCHMARKS.md, "Token scores").
AUTO_FLOOR = 0.2
DEFAULT_SELECTION = "head"  # see BENCHMARKS.md, "Per-head selection and chunk summaries" (issue 21)
DEFAULT_SUMMARIES = "off"  # see BENCHMARKS.md, "Per-head selection and chunk summaries" (issue 21)
MAX_MB = 2.0**40  # an exabyte: beyond any machine, and a byte count that stays an integer


@dataclass
class KVConfig:
    budget: str = "100%"  # tokens attended per layer on average: "25%" of the context, a count "2048", or "auto"
    # --kv-budget auto: per layer and step, as many chunks as the chunks' bounds say hold this share
    # of every head's attention (DEFAULT_COVERAGE when not given)
    coverage: float | None = None
    device_mb: float | None = None  # fast tier (float copies); None: every chunk stays there
    host_mb: float | None = None  # RAM for compressed chunks; None: unbounded
    disk_dir: Path | None = None  # where chunks go when the host budget is full
    bits: str = "auto"  # host/disk storage: auto = by importance (exact at a 100% budget)
    sink_tokens: int = 4  # the first tokens, always attended (attention sinks)
    recent_tokens: int = 64  # the last tokens, always attended
    observation_window: int = 32  # last prompt queries that measure each layer's attention skew
    # Read chunks from disk ahead of use (prefetch.py): auto = while the model thread's disk reads
    # wait for the device (not when the file sits in the page cache); on = always; off = never.
    prefetch: str = "auto"
    # Prefetch reads a layer's on-disk chunks that it selected in any of its last prefetch_steps
    # steps. The chunks left on disk are the ones at the margin of the selection, which come and go.
    # At 8K (SmolLM2, 25 %, 16 MB device + 64 MB host, disk reads past the page cache;
    # benchmarks/kv_prefetch.py) the last 1 / 3 / 8 steps predicted 53 / 70 / 84 % of the disk
    # chunks read, and the model thread waited 6.8 / 4.6 / 5.2 ms per token for the disk (12.3
    # without prefetch): 8 steps read 2.9 MB per token in vain and came late more often.
    prefetch_steps: int = 3
    disk_uncached: bool = False  # benchmarks: disk reads bypass the page cache (a store larger than RAM)
    # The mixed-bit attention op run as its ONNX form of standard operators
    # (kernels/mixed_attention_onnx.py) on this ONNX Runtime execution provider — an NPU's, say —
    # instead of the native kernel: the chunks in tiers are handed to it as stored. None: native.
    op_provider: str | None = None
    chunk_sizes: tuple[int, ...] | None = None  # for concentrated … diffuse layers; None: by tier set-up
    # A budgeted decode step adds each unread chunk as one pseudo-token (its mean key and value,
    # kernels/summaries.py): "on" or "off". None: the default where the cache attends itself
    # (DEFAULT_SUMMARIES); a graph attends over its views itself, so it runs without them.
    summaries: str | None = None
    # "layer": one set of chunks per layer, ranked by the head that wants each most; "head": each KV
    # head reads its own (the chunks in RAM only: a stored chunk holds every head). None: the default
    # where it can run (DEFAULT_SELECTION), "layer" elsewhere.
    selection: str | None = None
    # How decode ranks the chunks: "tokens" (each token's score on the query's largest channels,
    # summed per chunk: kernels/token_scores.py; every key in RAM) or "bounds" (each chunk's upper
    # bound from its keys' min / max: kernels/selection.py). None: tokens where every key is in RAM,
    # bounds where chunks live in tiers.
    scoring: str | None = None

    def __post_init__(self) -> None:
        self.bits = str(self.bits)
        if self.bits not in BITS_CHOICES:
            raise EdgetokError(f"{_name('bits')} must be one of {', '.join(BITS_CHOICES)}, not {self.bits}")
        self.budget = str(self.budget).strip()
        if self.coverage is not None and self.budget != "auto":
            raise EdgetokError(f"{_name('coverage')} is the target of --kv-budget auto; give --kv-budget auto too")
        if self.budget == "auto":
            if self.coverage is None:
                self.coverage = DEFAULT_COVERAGE
            if not (_is_number(self.coverage) and 0 < self.coverage < 1):  # (NaN fails too)
                raise EdgetokError(f"{_name('coverage')} is the share of attention --kv-budget auto keeps, "
                                   f"between 0 and 1 (0.99, say), not {self.coverage}")
            self.coverage = float(self.coverage)
        else:
            self._check_budget()
        self._check_summaries()
        self._check_placement()

    def _check_summaries(self) -> None:
        """--kv-summaries and --kv-selection: their choices, and where per-head selection can run."""
        if self.summaries is not None and self.summaries not in SUMMARIES_CHOICES:
            raise EdgetokError(f"{_name('summaries')} must be one of {', '.join(SUMMARIES_CHOICES)}, not {self.summaries}")
        if self.selection is not None and self.selection not in SELECTION_CHOICES:
            raise EdgetokError(f"{_name('selection')} must be one of {', '.join(SELECTION_CHOICES)}, not {self.selection}")
        if self.scoring is not None and self.scoring not in SCORING_CHOICES:
            raise EdgetokError(f"{_name('scoring')} must be one of {', '.join(SCORING_CHOICES)}, not {self.scoring}")
        if self.scoring == "tokens" and self.needs_homes:
            raise EdgetokError(f"{_name('scoring')} tokens scores every key in RAM at its float width: with "
                               "--kv-bits, --kv-device-mb or --kv-host-mb chunks live in tiers; use --kv-scoring bounds")
        if self.selection == "head" and self.needs_homes:
            raise EdgetokError(f"{_name('selection')} head needs every chunk in RAM at its float width: a stored chunk "
                               "(--kv-bits, --kv-device-mb, --kv-host-mb) holds all heads together")

    @property
    def asks_cache_attention(self) -> bool:
        """Whether an option asks for what only a cache that computes attention does."""
        return self.summaries == "on" or self.selection == "head"

    def per_head_for(self, attends: bool) -> bool:
        """Whether each KV head selects its own chunks. attends: the cache computes attention
        itself (a graph's views hold one set of chunks per layer)."""
        if not attends and self.selection == "head":
            raise EdgetokError(f"{_name('selection')} head needs a cache that computes attention (the torch backend, or "
                               "the default export with edgetok's attention operator): this graph reads one set of "
                               "chunks per layer")
        if self.needs_homes and self.selection == "head":
            raise EdgetokError(f"{_name('selection')} head reads each KV head's chunks in RAM: with tier budgets "
                               "(--kv-device-mb / --kv-host-mb / --kv-disk) a stored chunk holds every head, so they "
                               "share one selection (--kv-selection layer)")
        if not attends or self.needs_homes:
            return False
        return (self.selection or DEFAULT_SELECTION) == "head"

    @property
    def scores_tokens(self) -> bool:
        """Whether decode ranks chunks by token scores (--kv-scoring): wherever every key is in RAM."""
        return not self.needs_homes and self.scoring != "bounds"

    def summaries_for(self, attends: bool) -> bool:
        """Whether a cache folds in the summaries of the chunks it does not read. attends: the
        cache computes attention itself (a graph's views: the graph does)."""
        if not attends:
            if self.summaries == "on":
                raise EdgetokError(f"{_name('summaries')} on needs a cache that computes attention (the torch backend, "
                                   "or the default export with edgetok's attention operator): this graph attends over "
                                   "its views itself and cannot add the unread chunks' summaries")
            return False
        return (self.summaries or DEFAULT_SUMMARIES) == "on"

    def _check_budget(self) -> None:
        try:
            value = float(self.budget.removesuffix("%"))
        except ValueError:
            raise EdgetokError(f"{_name('budget')} must be a token count, a percentage like 25% or auto, not '{self.budget}'") from None
        count = not self.budget.endswith("%")
        if not math.isfinite(value) or value <= 0 or (not count and value > 100) or (count and value != int(value)):
            raise EdgetokError(f"--kv-budget {self.budget} (KVConfig.budget) is impossible: give a whole, positive "
                               "token count, a percentage in (0, 100], or auto")

    def _check_placement(self) -> None:
        """Tier budgets, the disk folder, prefetch; chunk sizes by where chunks live."""
        for name in ("device_mb", "host_mb"):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and 0 <= v <= MAX_MB):  # (NaN fails both)
                raise EdgetokError(f"{_name(name)} must be a number of MB from 0 to {MAX_MB:.0e}, not {v}")
        if self.prefetch not in PREFETCH_CHOICES:
            raise EdgetokError(f"{_name('prefetch')} must be one of {', '.join(PREFETCH_CHOICES)}, not {self.prefetch!r}")
        if not (_is_number(self.prefetch_steps) and isinstance(self.prefetch_steps, int)) or self.prefetch_steps < 1:
            raise EdgetokError(f"{_name('prefetch_steps')} must be a whole number ≥ 1 (the past steps whose selections prefetch reads), "
                               f"not {self.prefetch_steps}")
        if self.host_mb is not None and self.disk_dir is None:
            raise EdgetokError(f"{_name('host_mb')} needs {_name('disk_dir')}: chunks beyond the host budget go to disk")
        if self.disk_uncached and self.disk_dir is None:
            raise EdgetokError(f"{_name('disk_uncached')} needs {_name('disk_dir')}: it changes how the disk tier is read")
        if self.op_provider is not None:
            self._check_op_provider()
        if self.disk_dir is not None:
            if not isinstance(self.disk_dir, (str, os.PathLike)):
                raise EdgetokError(f"{_name('disk_dir')} must be a folder's path, not {self.disk_dir!r}")
            self.disk_dir = Path(self.disk_dir)
        if self.chunk_sizes is None:
            # In RAM, small chunks select finely at no cost. Chunks that live in host RAM or on disk
            # are read, decoded and bookkept one by one every step: there, fewer and larger ones
            # (bigger sequential reads, as LeoAM does for its lower tiers) pay off.
            self.chunk_sizes = (128, 192, 256) if self.needs_homes else (16, 32, 64)

    def _check_op_provider(self) -> None:
        import onnxruntime as ort

        if not self.needs_homes:
            raise EdgetokError(f"{_name('op_provider')} hands the op chunks as the tiers store them: give tier budgets "
                               f"({_name('device_mb')}, {_name('host_mb')} or {_name('disk_dir')}) too")
        if self.op_provider not in ort.get_available_providers():
            raise EdgetokError(f"{_name('op_provider')} {self.op_provider!r} is not an execution provider of this "
                               f"onnxruntime (it has {', '.join(ort.get_available_providers())})")

    @property
    def is_auto(self) -> bool:
        return self.budget == "auto"

    @property
    def is_percent(self) -> bool:
        return self.budget.endswith("%")

    def budget_tokens(self, context: int) -> int:
        """The average per-layer token budget at this context length (auto: no fixed budget, all of it)."""
        if self.is_auto:
            return context
        if self.is_percent:
            return max(1, round(float(self.budget[:-1]) / 100 * context))
        return int(float(self.budget))

    @property
    def full_budget(self) -> bool:
        return self.is_percent and float(self.budget[:-1]) >= 100

    def storage_bits(self) -> str:
        """'32' when every chunk must stay exact, else the --kv-bits choice."""
        if self.bits == "auto" and self.full_budget:
            return "32"
        return self.bits

    @property
    def needs_homes(self) -> bool:
        """Chunks get a (compressed) home in host/disk memory, with float copies cached on device."""
        return self.device_mb is not None or self.host_mb is not None or self.bits not in ("auto", "32")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _name(field: str) -> str:
    """An option as both its users know it: the flag and the field (--kv-budget (KVConfig.budget))."""
    flag = "--kv-disk" if field == "disk_dir" else f"--kv-{field.replace('_', '-')}"
    return f"{flag} (KVConfig.{field})"
