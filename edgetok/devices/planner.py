"""The plan: which engine, weights, KV budget, tiers and KV bits fit a device, and what they cost.

A plan is arithmetic a user can check, and it shows it: the bytes each part needs, where each lives,
the bytes a decode step reads from each tier ÷ that tier's bandwidth, plus fixed costs measured on
this project's reference machine (the constants below say where). It plans for edgetok's fast
engine: an int4 ONNX export on ONNX Runtime, with the device profile's execution provider.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from edgetok.devices.catalog import DeviceProfile
from edgetok.errors import EdgetokError
from edgetok.kernels import ort_ops
from edgetok.models.config import ModelConfig
from edgetok.runtimes.backends.providers import PROVIDERS
from edgetok.runtimes.kv.config import MAX_MB, KVConfig

MB, GB = 1 << 20, 1e9
# int4 MatMulNBits: 4-bit codes + an fp16 scale and an fp16 zero point per block of 32 weights;
# the tied embedding / LM head at 8 bits + an fp16 scale per 32 (exporters/onnx.py's defaults).
# SmolLM2-135M: 96.5 MB by this arithmetic, 100.5 MB on disk (BENCHMARKS.md, ONNX parity table).
INT4_BYTES_PER_WEIGHT = (4 + 2 * 16 / 32) / 8
HEAD_BYTES_PER_WEIGHT = (8 + 16 / 32) / 8
KV_BYTES_PER_VALUE = 4  # the graph reads float32 K/V
# what a sliding layer holds beyond its window: ContiguousCache.ROLLBACK, and half its compaction period
WINDOW_SLACK = 64 + 128
# Measured on the reference machine (2-core Xeon): peak RSS minus weights, KV and prefill workspace.
# Session 5 refit (benchmarks/planner.py on the default engine: no torch on the run path, MatMulQ4
# reading its weights where they are, no pre-packed copy): ≈ 400 MB (it was 500 with torch loaded).
RUNTIME_BASE_BYTES = 400 * MB
# A budgeted cache's policy computes in torch, which the exact engine never imports: its RSS on import
# (numpy + onnxruntime 45 MB → 237 MB with torch, session 6).
TORCH_BYTES = 190 * MB
# ... and decode, refitted on benchmarks/planner.py's runs of the plans themselves (BENCHMARKS.md,
# "The planner applied"): at 1K 14.3 ms and at 4K 37.7 ms per token, with the weights' 92 MB at the
# measured 25.9 GB/s copy bandwidth. The 3K tokens between them cost 23.4 ms: attention reads its K/V
# at 70 % of the copy bandwidth (CPU_KV_BANDWIDTH_SHARE); what remains at 1K, 2.8 ms for 135 M
# parameters at 2 threads, is compute (int4 dequantization, norms, the head): 21 ps per
# parameter-thread. (The first cut's 81 ps, from one 1K row, predicted 1K decode 29 % slow.)
# Session 5 refit, edgetok's operators (MatMulQ4, its attention reading each KV head once per query
# group): at 1K 11.75 ms per token = weights 3.91 ms + KV 2.6 ms + 5.24 ms for 135 M parameters at 2
# threads: 78 ps per parameter-thread (float32 arithmetic where the int8 kernels took less).
# Devices other than a CPU are assumed to need 30 µs per layer (kernel launches).
CPU_COMPUTE_S_PER_PARAM_THREAD = 78e-12
CPU_KV_BANDWIDTH_SHARE = 0.70
# Where edgetok's attention operator runs (a CPU with AVX2 + FMA), the graph hands each layer's
# attention to the tiered cache, which reads the selected chunks where they live, at their stored
# widths (the device tier caches stored forms). Elsewhere a graph attends to float views of the
# selected chunks, kept staged between steps (kv/staging.py): a step fetches from the tiers only the
# chunks entering the selection — measured at 8K (SmolLM2, 25 %, a 133 MB device tier, the rest on
# disk): 11.5 MB fetched per step, 13 % of the 90 MB the budget attends — and the stage holds the
# selection in float beside the tiers.
STAGE_CHURN = 0.13
ACCELERATOR_S_PER_LAYER = 30e-6
# ... and selecting chunks (bounds of every chunk, top-k): session 7's native selection, measured
# inside the default engine's step at 8K with the 25 % budget (benchmarks/attention_costs.py
# --backend onnxruntime): 3.0 ms per token for 7,680 chunks of 32 tokens on average at 2 threads
# (it was 1.8 µs per chunk at 2 threads in torch, session 5). Not yet checked by benchmarks/planner.py.
SELECTION_S_PER_CHUNK_THREAD = 0.39e-6 * 2
# ... and, where the cache attends over tiers (through), the bookkeeping of each attended chunk read
# from a tier (lookup, heat, admission: Python, one thread): 4.5 µs, fitted on benchmarks/planner.py's
# synthetic row (session 6: 40.4 ms per token measured, 31.4 predicted without it, 1920 chunks read).
TIER_S_PER_CHUNK = 4.5e-6
MEAN_CHUNK = 32
PREFILL_PIECE = 512  # prompt tokens per graph run (GenerationConfig.prefill_chunk)
# longer contexts get the tiered cache. With edgetok's attention op, an 8K exact cache decodes faster than
# the 25 % tiered one (SmolLM2 30.5 vs 27.3 tok/s, Gemma 3 47.7 vs 42.1; BENCHMARKS.md, session 5)
EXACT_UP_TO = 8192
TIERED_BUDGET = 0.25
AUTO_BITS_RATIO = 9 / 32  # --kv-bits auto: a quarter of chunks at 16 bits, half at 8, a quarter at 4
MARGIN = 0.85  # of a memory the plan may fill: the rest is for the OS and other programs
MAX_THREADS = 4096
# what `edgetok plan --json` writes beside a plan's fields (a saved plan carries them; reading ignores them)
PLAN_FILE_EXTRAS = ("model", "run_options")


@dataclass(frozen=True)
class Plan:
    device: str
    context: int
    engine: str
    execution_provider: str
    weights: str
    threads: int
    kv_budget: str
    kv_bits: str
    shared_memory: bool  # the device's memory is the host's (a CPU, an NPU, unified memory): one peak
    kv_device_mb: float | None  # None: the whole cache on the device, no tiers
    kv_host_mb: float | None
    kv_disk: bool
    predicted_peak_device_bytes: int
    predicted_peak_host_bytes: int
    predicted_decode_tokens_per_s: float
    # per decode step, the KV bytes read from each tier (device, host, disk): tier_reads()
    predicted_kv_read_bytes: dict[str, float] = field(default_factory=dict)
    arithmetic: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """A plan read from a file is checked like one the planner made: one sentence per fault."""
        where = f"the plan for '{self.device}'"
        if self.engine != "onnxruntime" or self.weights != "int4":
            raise EdgetokError(f"{where} runs {self.engine} with {self.weights} weights; edgetok plans for "
                               f"onnxruntime with int4 weights (make the plan again with `edgetok plan`)")
        if self.execution_provider not in PROVIDERS:
            raise EdgetokError(f"{where}: execution_provider must be one of {', '.join(PROVIDERS)}, "
                               f"not {self.execution_provider!r}")
        for name, low, high in (("context", 1, 1 << 40), ("threads", 1, MAX_THREADS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise EdgetokError(f"{where}: {name} must be a whole number from {low} to {high}, not {value!r}")
        for name in ("shared_memory", "kv_disk"):
            if not isinstance(getattr(self, name), bool):
                raise EdgetokError(f"{where}: {name} must be true or false, not {getattr(self, name)!r}")
        tiers = [self.kv_device_mb, self.kv_host_mb]
        if tiers.count(None) == 1:
            raise EdgetokError(f"{where}: kv_device_mb and kv_host_mb are both numbers (tiers) or both null (no tiers)")
        for name in ("kv_device_mb", "kv_host_mb", "predicted_peak_device_bytes", "predicted_peak_host_bytes",
                     "predicted_decode_tokens_per_s"):
            value = getattr(self, name)
            if value is None and name.startswith("kv_"):
                continue
            high = MAX_MB if name.startswith("kv_") else MAX_MB * MB
            if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and 0 <= value <= high):
                raise EdgetokError(f"{where}: {name} = {value!r} is absurd: give a number from 0 to {high:g}")
        if self.kv_disk and self.kv_device_mb is None:
            raise EdgetokError(f"{where}: kv_disk needs tiers (kv_device_mb and kv_host_mb)")
        reads = self.predicted_kv_read_bytes
        if not isinstance(reads, dict) or not set(reads) <= {"device", "host", "disk"} or not all(
                isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b) and b >= 0 for b in reads.values()):
            raise EdgetokError(f"{where}: predicted_kv_read_bytes must map device, host and disk to byte counts ≥ 0")
        if not isinstance(self.arithmetic, list) or not all(isinstance(line, str) for line in self.arithmetic):
            raise EdgetokError(f"{where}: arithmetic must be a list of lines of text")
        try:
            self.kv_config(Path("."))  # (checks budget and bits; makes nothing)
        except EdgetokError as e:
            raise EdgetokError(f"{where}: {e}") from None

    @classmethod
    def from_dict(cls, data: object, origin: str) -> Plan:
        """A plan from JSON (`edgetok plan --json`'s output), or one sentence about what is wrong."""
        if not isinstance(data, dict):
            raise EdgetokError(f"{origin} is not a plan: expected the JSON object `edgetok plan --json` prints")
        names = [f.name for f in fields(cls)]
        optional = {f.name for f in fields(cls) if f.default_factory is not MISSING}
        missing = [n for n in names if n not in data and n not in optional]
        if missing:
            raise EdgetokError(f"{origin} is missing {', '.join(missing)} (save a plan with `edgetok plan MODEL --json`)")
        unknown = sorted(set(data) - set(names) - set(PLAN_FILE_EXTRAS))
        if unknown:
            raise EdgetokError(f"{origin} has unknown fields {', '.join(map(str, unknown))} (a plan has {', '.join(names)})")
        return cls(**{n: data[n] for n in names if n in data})

    def to_dict(self) -> dict:
        return asdict(self)

    def kv_config(self, disk_dir: Path) -> KVConfig | None:
        """The tiered cache this plan sets, or None (exact). disk_dir: where chunks past the host
        tier go (a tiered plan names one even when it expects none to get there)."""
        if self.kv_budget == "100%" and self.kv_device_mb is None:
            return None
        tiers = {} if self.kv_device_mb is None else {"device_mb": self.kv_device_mb, "host_mb": self.kv_host_mb,
                                                      "disk_dir": disk_dir}
        return KVConfig(budget=self.kv_budget, bits=self.kv_bits, **tiers)

    def run_options(self) -> list[str]:
        """The `edgetok run` options that apply this plan."""
        options = ["--provider", self.execution_provider, "--threads", str(self.threads)]
        if self.kv_budget != "100%" or self.kv_device_mb is not None:
            options += ["--kv-budget", self.kv_budget]
        if self.kv_device_mb is not None:
            options += ["--kv-bits", self.kv_bits, "--kv-device-mb", f"{self.kv_device_mb:g}",
                        "--kv-host-mb", f"{self.kv_host_mb:g}", "--kv-disk", "DIR"]
        return options


def load_plan(path: Path) -> Plan:
    """A plan saved by `edgetok plan --json` (or --out), or one sentence about what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgetokError(f"{path} does not exist (save a plan with `edgetok plan MODEL --out {path}`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgetokError(f"{path} is not a readable JSON plan ({e})") from None
    return Plan.from_dict(data, str(path))


def prefill_workspace(cfg: ModelConfig, context: int, provider: str = "cpu", through: bool = False) -> int:
    """The memory a prefill piece needs beyond weights and KV. The CPU's GroupQueryAttention
    materializes the piece's attention scores (piece × context × heads, twice: scores and softmax);
    CUDA's runs flash / memory-efficient attention, so there only the piece's activations count.
    through: the graph hands attention to the tiered cache, which attends one layer at a time over
    bf16 K/V (--kv-bits auto): one layer's bf16 scores."""
    piece = min(PREFILL_PIECE, context)
    if provider == "cuda":
        return 4 * piece * (4 * cfg.hidden_size + 3 * cfg.intermediate_size)
    if through:
        return piece * context * cfg.num_heads * 2
    return 2 * piece * context * cfg.num_heads * 4


def tier_reads(kv_read: float, kv_full: float, device_kv: float, host_kv: float, disk_kv: float,
               device_stored: bool = False) -> dict[str, float]:
    """Bytes a decode step reads from each tier. Of the float bytes attended (kv_read), the share
    the device tier holds (device_kv of kv_full: float copies, or with device_stored the stored forms,
    ~AUTO_BITS_RATIO of the floats each) is read there; the rest is read in its stored form from host
    and disk, in proportion to what each holds."""
    homes = host_kv + disk_kv
    ratio = AUTO_BITS_RATIO if homes else 1.0
    held = kv_full * (ratio if device_stored else 1.0)  # what the device tier would need for all of it
    share = min(device_kv / held, 1.0) if held else 0.0
    on_device = kv_read * share * (ratio if device_stored else 1.0)
    stored = kv_read * (1.0 - share) * ratio
    host = stored * host_kv / homes if homes else 0.0
    return {"device": on_device, "host": host, "disk": stored - host}


def weight_bytes(cfg: ModelConfig) -> int:
    """The int4 export's weights: the linears at 4 bits, the embedding (and an untied head) at 8."""
    head = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return round((cfg.n_params - head) * INT4_BYTES_PER_WEIGHT + head * HEAD_BYTES_PER_WEIGHT)


def kv_layout(cfg: ModelConfig, context: int) -> tuple[int, int]:
    """Bytes of an fp32 KV cache at `context` tokens: (the sliding layers', the full-attention
    layers'). A sliding layer holds its window and what the exact cache keeps beyond it (its rollback
    margin and, on average, half of a compaction period: runtimes/kv/contiguous.py); a full layer
    holds every token."""
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * KV_BYTES_PER_VALUE
    windows = [w for w in cfg.windows if w is not None and w < cfg.max_context]
    held = sum(min(context, w + WINDOW_SLACK) for w in windows)
    return held * per_token, (cfg.num_layers - len(windows)) * context * per_token


def plan(cfg: ModelConfig, profile: DeviceProfile, context: int | None = None, threads: int | None = None) -> Plan:
    """The plan for `cfg` on `profile` at `context` tokens (default: the model's whole context)."""
    context = cfg.max_context if context is None else context
    if not 1 <= context <= cfg.max_context:
        raise EdgetokError(f"--context {context} is impossible: the model holds 1 to {cfg.max_context} tokens")
    threads = threads or 1
    lines: list[str] = []
    weights = weight_bytes(cfg)
    kv_windows, kv_global = kv_layout(cfg, context)  # only the full-attention layers are budgeted and tiered
    kv_full = kv_windows + kv_global
    workspace = prefill_workspace(cfg, context, profile.execution_provider)
    shared = profile.kind != "gpu"  # the device's memory is the host's
    device_budget = MARGIN * profile.device_memory_gb * GB
    host_budget = MARGIN * profile.host_memory_gb * GB - RUNTIME_BASE_BYTES
    lines.append(f"weights (int4 ONNX): {weights / MB:.1f} MB; KV at {context} tokens (fp32): {kv_full / MB:.1f} MB"
                 + (f" ({kv_windows / MB:.1f} MB of it the sliding layers' windows)" if kv_windows else "") + "; "
                 f"prefill workspace: {workspace / MB:.1f} MB; runtime: {RUNTIME_BASE_BYTES / MB:.0f} MB (host)")
    lines.append(f"usable ({MARGIN:.0%}): device {device_budget / MB:.0f} MB, host {host_budget / MB:.0f} MB after the runtime"
                 + (" (the same memory)" if shared else ""))
    if host_budget <= 0:
        raise EdgetokError(f"nothing fits on {profile.name}: {MARGIN:.0%} of its {profile.host_memory_gb:g} GB of host memory "
                           f"does not hold the runtime itself ({RUNTIME_BASE_BYTES / MB:.0f} MB)")
    if weights + workspace > device_budget:
        raise EdgetokError(f"nothing fits on {profile.name}: the weights ({weights / MB:.0f} MB) and the prefill workspace "
                           f"({workspace / MB:.0f} MB) need more than {device_budget / MB:.0f} MB of device memory, "
                           f"with {RUNTIME_BASE_BYTES / MB:.0f} MB for the runtime on the host")

    budget = 1.0 if context <= EXACT_UP_TO else TIERED_BUDGET
    # edgetok's attention operator hands each layer to the tiered cache (CPUs with AVX2 + FMA)
    through = profile.kind == "cpu" and ort_ops.attention_available()
    room = device_budget - weights - workspace - (RUNTIME_BASE_BYTES if shared else 0)
    torch_bytes = 0
    if kv_full <= room - (TORCH_BYTES if shared and budget < 1 else 0):
        device_kv, host_kv, disk_kv, bits = kv_full, 0.0, 0.0, "32"  # in RAM a budgeted cache keeps floats too
        lines.append(f"the whole KV cache fits on the device ({kv_full / MB:.1f} ≤ {room / MB:.0f} MB): no tiers")
    else:
        budget, bits = TIERED_BUDGET, "auto"
        if through:
            # The cache attends a layer at a time (no graph materializes scores), reading chunks at
            # their stored widths where they live; on a CPU a device tier would be a second copy of
            # host homes in the same RAM: chunks live in RAM up to what fits, the rest on disk.
            room += workspace
            workspace = prefill_workspace(cfg, context, profile.execution_provider, through=True)
            room -= workspace
            device_kv = 0.0
            stored = kv_global * AUTO_BITS_RATIO
            host_kv = min(stored, max(room - TORCH_BYTES - kv_windows, 0.0))
        else:
            # (the windows stay on the device; a graph's views stage the selection in float beside
            # the tiers, in host memory: where that is the device's, it takes room there)
            stage = budget * kv_global if shared else 0.0
            device_kv = max(room - (TORCH_BYTES if shared else 0) - kv_windows - stage, 0.0)
            stored = (kv_global - device_kv) * AUTO_BITS_RATIO  # host and disk keep chunks compressed
            host_kv = min(stored, max(host_budget - TORCH_BYTES - (weights + workspace + device_kv if shared else 0), 0.0))
        disk_kv = stored - host_kv
        lines.append(f"KV does not fit the device ({kv_full / MB:.0f} > {room / MB:.0f} MB): tiered at {budget:.0%}, "
                     + (f"prefill workspace {workspace / MB:.1f} MB (the cache attends, a layer at a time), "
                        if through else f"device {device_kv / MB:.0f} MB of float chunks, ")
                     + f"host {host_kv / MB:.0f} MB and disk {disk_kv / MB:.0f} MB of chunks at ~{32 * AUTO_BITS_RATIO:.0f} bits")
    if budget < 1:
        torch_bytes = TORCH_BYTES
        lines.append(f"the budgeted cache computes in torch: {TORCH_BYTES / MB:.0f} MB more runtime (host)")
    # A decode step reads every weight and the KV it attends to, each KV head once for its query group
    # (edgetok's attention; ONNX Runtime's CPU GroupQueryAttention read it once per query head, the
    # default engine's before session 5 — and still where a CPU lacks AVX2)
    reread = 1 if profile.kind != "cpu" or ort_ops.attention_available() else cfg.num_heads // cfg.num_kv_heads
    kv_read = (kv_windows + budget * kv_global) * reread
    tiers = host_kv + disk_kv > 0
    if through and tiers:  # the cache's attention reads the selection where it lives, at its stored widths
        reads = tier_reads(budget * kv_global * reread, kv_global, device_kv, host_kv, disk_kv, device_stored=True)
        reads["device"] += kv_windows * reread
        kv_read = sum(reads.values())
    else:
        # attention reads the staged views (device memory); with tiers, the chunks entering the
        # selection are fetched from where they live
        fetched = STAGE_CHURN * budget * kv_global if tiers else 0.0
        reads = tier_reads(fetched, kv_global, device_kv, host_kv, disk_kv)
        reads["device"] += kv_read
    from_device, from_host, from_disk = reads["device"], reads["host"], reads["disk"]
    t_weights = weights / (profile.device_bandwidth_gb_s * GB)
    kv_bandwidth = profile.device_bandwidth_gb_s * (CPU_KV_BANDWIDTH_SHARE if profile.kind == "cpu" else 1.0)
    t_kv = (from_device / (kv_bandwidth * GB) + from_host / (profile.host_to_device_gb_s * GB)
            + from_disk / (profile.disk_read_gb_s * GB))
    if profile.kind == "cpu":
        t_fixed = cfg.n_params * CPU_COMPUTE_S_PER_PARAM_THREAD / threads
        fixed = f"compute {cfg.n_params / 1e6:.0f} M params × {CPU_COMPUTE_S_PER_PARAM_THREAD * 1e12:.0f} ps ÷ {threads} threads"
    else:
        t_fixed = cfg.num_layers * ACCELERATOR_S_PER_LAYER
        fixed = f"{cfg.num_layers} layers × {ACCELERATOR_S_PER_LAYER * 1e6:.0f} µs (assumed launch overhead)"
    chunks = kv_global / (2 * cfg.num_kv_heads * cfg.head_dim * KV_BYTES_PER_VALUE) / MEAN_CHUNK if budget < 1 else 0
    t_select = chunks * SELECTION_S_PER_CHUNK_THREAD / threads if profile.kind == "cpu" else 0.0
    if chunks:
        fixed += f"; selection {chunks:.0f} chunks × {SELECTION_S_PER_CHUNK_THREAD * 1e6:.1f} µs ÷ {threads} threads"
        t_fixed += t_select
    if through and tiers and profile.kind == "cpu":
        fixed += f"; tier reads {budget * chunks:.0f} chunks × {TIER_S_PER_CHUNK * 1e6:.1f} µs"
        t_fixed += budget * chunks * TIER_S_PER_CHUNK
    step = t_weights + t_kv + t_fixed
    lines.append(f"per token: weights {weights / MB:.0f} MB ÷ {profile.device_bandwidth_gb_s:g} GB/s = {1e3 * t_weights:.2f} ms; "
                 f"KV {kv_read / MB:.0f} MB attended ({budget:.0%}"
                 + (" of the full layers' tokens, the windows whole," if kv_windows else "") + f" × {reread}× per query group"
                 + ((", at the chunks' stored widths" if through else f", {STAGE_CHURN:.0%} of it fetched into the stage")
                    if tiers else "") + "), read as "
                 f"device {from_device / MB:.0f} MB at {kv_bandwidth:.3g} GB/s + host {from_host / MB:.0f} + disk "
                 f"{from_disk / MB:.0f} MB = {1e3 * t_kv:.2f} ms; "
                 f"{fixed} = {1e3 * t_fixed:.2f} ms → {1e3 * step:.2f} ms")
    stage = budget * kv_global if tiers and not through else 0.0  # (device_kv: the full layers' share)
    peak_device = round(weights + workspace + device_kv + (kv_windows if tiers else 0) + (stage if shared else 0))
    peak_host = round(RUNTIME_BASE_BYTES + torch_bytes + host_kv + (peak_device if shared else stage))
    return Plan(
        device=profile.name, context=context, engine="onnxruntime", execution_provider=profile.execution_provider,
        weights="int4", threads=threads, kv_budget=f"{budget:.0%}", kv_bits=bits, shared_memory=shared,
        kv_device_mb=None if host_kv + disk_kv == 0 else round(device_kv / MB, 1),
        kv_host_mb=None if host_kv + disk_kv == 0 else round(host_kv / MB, 1), kv_disk=disk_kv > 0,
        predicted_peak_device_bytes=peak_device, predicted_peak_host_bytes=peak_host,
        predicted_decode_tokens_per_s=round(1 / step, 2), predicted_kv_read_bytes={t: round(b) for t, b in reads.items()},
        arithmetic=lines,
    )


@dataclass(frozen=True)
class LoadEstimate:
    """The peak memory one loaded model needs, by the plan's arithmetic (edgetok.load(max_memory_bytes=))."""

    weights: int  # bytes of the weights as the backend holds them
    kv: int  # the KV cache at `context` tokens
    workspace: int  # a prefill piece's attention scores
    runtime: int = RUNTIME_BASE_BYTES
    context: int = 0

    @property
    def peak(self) -> int:
        return self.weights + self.kv + self.workspace + self.runtime

    def words(self) -> str:
        return (f"about {self.peak / MB:.0f} MB at its {self.context}-token context (weights {self.weights / MB:.0f} MB, "
                f"KV {self.kv / MB:.0f} MB, prefill workspace {self.workspace / MB:.0f} MB, runtime {self.runtime / MB:.0f} MB)")


def load_estimate(cfg: ModelConfig, weights: int, kv_bytes_per_value: float, context: int | None = None,
                  kv_bytes: int | None = None) -> LoadEstimate:
    """`weights` bytes held, an exact KV cache of `context` tokens (default: the model's) at
    kv_bytes_per_value — or kv_bytes when a tiered cache bounds it — and plan()'s workspace."""
    context = cfg.max_context if context is None else context
    kv = round(cfg.kv_bytes_per_token(1) * kv_bytes_per_value * context) if kv_bytes is None else kv_bytes
    workspace = prefill_workspace(cfg, context)
    return LoadEstimate(weights, kv, workspace, context=context)
