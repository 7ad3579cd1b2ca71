"""What an export says about itself, as dataclasses written and read by the same code.

- `OnnxManifest`: edgetok.json inside an ONNX export folder. The exporter writes it; the loader
  (models/sources.py) reads it back and the onnxruntime backend runs the graph by it.
- `GgufManifest`: the report beside a GGUF file (`model.gguf.json`), for people and scripts.

JSON keys are the field names, in field order; a field marked `_OPTIONAL` is left out while None
(a report without a parity section says so by not having one). A plain module: no torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgetok.errors import EdgetokError
from edgetok.files import read_json, write_json_atomic
from edgetok.models.config import ModelConfig
from edgetok.version import __version__

# The files of an ONNX export folder.
ONNX_MANIFEST = "edgetok.json"
ONNX_MODEL = "model.onnx"
ONNX_DATA = "model.onnx.data"  # the weights, external to model.onnx
# The version of the graph's inputs and outputs (exporters/onnx_graph.py) and of OnnxManifest,
# which describes them: one number, since neither is readable without the other. A loader
# refuses every other version.
ONNX_GRAPH_VERSION = 3


def gguf_report_path(gguf: Path) -> Path:
    """Where the report of the GGUF file at `gguf` goes: beside it, `gguf`.json."""
    return gguf.with_name(gguf.name + ".json")


_OPTIONAL = {"optional": True}  # field metadata: omitted from JSON while None


@dataclass
class ParityReport:
    """How close an artifact's next-token distributions are to the reference model's."""

    tokens: int  # positions compared
    top1_agreement: float  # fraction of positions whose argmax matches the reference's
    max_abs_dlogit: float
    perplexity_reference: float  # of the text itself, under each model
    perplexity: float
    kl_mean: float  # mean KL(reference ‖ artifact) over positions, in nats
    kl_max: float

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        return (
            f"top-1 agreement {self.top1_agreement:.1%}, perplexity {self.perplexity:.3f} "
            f"(reference {self.perplexity_reference:.3f}, {self.perplexity / self.perplexity_reference - 1:+.2%}), "
            f"KL mean {self.kl_mean:.4f} max {self.kl_max:.3f}, max |Δlogit| {self.max_abs_dlogit:.3f} "
            f"over {self.tokens} tokens"
        )


@dataclass(kw_only=True)
class Parity(ParityReport):
    """A parity report as a manifest keeps it: the numbers (rounded) and what was compared."""

    reference: str  # what computed the reference logits
    runtime: str  # what ran the artifact
    text: str  # the evaluation text

    @classmethod
    def of(cls, report: ParityReport, **compared: str) -> Parity:
        return cls(**report.to_dict(), **compared)


class _Json:
    """to_json / from_json, and write / read for the manifests, of the dataclasses below."""

    # field → how to read its JSON value back (nested records); other fields are plain JSON
    _READERS: ClassVar[dict[str, Callable[[Any], Any]]] = {}
    WHAT: ClassVar[str]  # what a manifest's file is called in messages

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional"):
                continue
            if isinstance(value, _Json):
                value = value.to_json()
            elif is_dataclass(value):
                value = asdict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        """Keys this version does not know are ignored (a later edgetok may add some); a missing
        or malformed one raises EdgetokError."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: cls._READERS[k](v) if k in cls._READERS and v is not None else v
                          for k, v in data.items() if k in known})
        except (TypeError, ValueError, AttributeError) as e:
            raise EdgetokError(f"the {cls.__name__} is malformed ({e})") from None

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def read(cls, path: Path):
        """The manifest at `path`; one sentence for a file that is not one, or not one this
        version reads."""
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != cls.__dataclass_fields__["format"].default:
            raise EdgetokError(f"{path} is not an {cls.WHAT}")
        cls._check_version(path, data)
        try:
            return cls.from_json(data)
        except EdgetokError:
            raise EdgetokError(f"{path} is not an {cls.WHAT}") from None

    @classmethod
    def _check_version(cls, path: Path, data: dict[str, Any]) -> None:
        """Refuse what an older or newer edgetok wrote, where that matters (before reading fields)."""


@dataclass(frozen=True)
class PruneSpec:
    """Where and how an ONNX graph prunes the prompt (runtimes/prune.py's PrunePlan less the keep
    fraction, which is a graph input)."""

    after_layer: int
    sinks: int
    window: int
    pool: int

    def positioned_layers(self, windows: list[int | None]) -> list[int]:
        """The sliding-window layers after the pruning point (windows: ModelConfig.graph_windows):
        they hold a pruned prompt's kept tokens, whose positions have gaps, so their windows count
        positions, which the graph reads (names.PAST_POSITIONS)."""
        return [i for i, w in enumerate(windows) if i > self.after_layer and w is not None]


def portable_path(path: Path, beside: Path) -> str:
    """`path` as a report shared with others may show it: relative to the folder `beside` when it is
    near (at most two folders up), else its name alone — never the writer's absolute paths."""
    rel = Path(os.path.relpath(Path(path).resolve(), Path(beside).resolve()))
    ups = next((i for i, part in enumerate(rel.parts) if part != ".."), len(rel.parts))
    return rel.as_posix() if ups <= 2 else Path(path).name


@dataclass(kw_only=True)
class SourceRecord(_Json):
    """The model an export was made from: named (not located: a report travels) and hashed."""

    ref: str  # a built-in name as the user gave it, else the same as path
    path: str  # relative to the artifact's folder when near it, else the file or folder name (portable_path)
    format: str  # "gguf" | "hf"
    sha256: str | None  # a GGUF's hash (None for HF folders)
    fingerprint: str | None = field(default=None, metadata=_OPTIONAL)  # Source.fingerprint (ONNX manifests)

    @classmethod
    def of(cls, source, beside: Path, fingerprint: bool = False) -> SourceRecord:
        """From a models.sources.Source (this module is below it: no import), for a manifest in the
        folder `beside`."""
        path = portable_path(source.path, beside)
        builtin = Path(source.ref).expanduser() != Path(source.path)  # a name resolve_path looked up
        ref = source.ref if builtin else path
        return cls(ref=ref, path=path, format=source.format, sha256=source.info.get("sha256"),
                   fingerprint=source.fingerprint if fingerprint else None)


@dataclass(kw_only=True)
class OnnxManifest(_Json):
    """edgetok.json: where the export came from, how it was quantized, how to run its graph."""

    edgetok_version: str = __version__
    format: str = "onnx"
    source: SourceRecord
    architecture: str
    config: ModelConfig  # of the graph's weights (rsq: the rotated model's, head untied)
    weights: str  # --weights: fp32 | fp16 | int8 | int4 | auto | source
    method: str | None  # rtn | gptq | rsq; None for float weights
    quantization: dict[str, Any]  # what quantize_model reports ({} for rtn)
    block_size: int | str | None  # weights per scale, "per-channel", "source" (the GGUF's), or None for float weights
    zero_points: str | None  # int4 MatMulNBits rounded by rtn: "exact" | "integer"
    head_bits: int | None  # int4: the embedding and LM head's bits
    # MatMulNBits' layer activations, "int8" | "float"; None: no MatMulNBits, or made before the field (int8)
    activations: str | None = field(default=None, metadata=_OPTIONAL)
    qdq: bool
    opset: int
    graph_version: int = ONNX_GRAPH_VERSION
    attention: str  # "gqa" | "standard"
    # edgetok's own operators in the graph (domain ai.edgetok: MatMulQ4, GroupQueryAttention); None: made before the field
    edgetok_ops: list[str] | None = field(default=None, metadata=_OPTIONAL)
    prune: PruneSpec | None  # None: the graph cannot prune a prompt
    io: dict[str, list[str]]  # names.io_names: {"inputs": [...], "outputs": [...]}
    rope_inv_freq: list[float]  # the graph's RoPE frequencies; the runtime rotates qkv.i with them
    files: dict[str, str]  # {"model": ONNX_MODEL, "data": ONNX_DATA}
    graph_sha256: str  # the first 32 hex digits of each file's SHA-256, joined
    # file name → SHA-256 of every file in the folder but this manifest; the loader refuses a
    # mismatch (exports written before it check graph_sha256's two files)
    sha256: dict[str, str] | None = field(default=None, metadata=_OPTIONAL)
    size_bytes: int  # model.onnx + model.onnx.data
    parity: Parity | None = field(default=None, metadata=_OPTIONAL)
    parity_summary: str | None = field(default=None, metadata=_OPTIONAL)
    export_seconds: float | None = field(default=None, metadata=_OPTIONAL)
    # --weights auto: exporters/allocate.py's Allocation (each matrix's type, and why)
    allocation: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)
    # --genai: the graph has onnxruntime-genai's inputs and outputs (exporters/genai.py) and runs
    # there, not on edgetok's onnxruntime backend; None: edgetok's own
    genai: bool | None = field(default=None, metadata=_OPTIONAL)

    _READERS: ClassVar = {"source": SourceRecord.from_json, "config": ModelConfig.from_dict,
                          "prune": lambda d: PruneSpec(**d), "parity": lambda d: Parity(**d)}
    WHAT: ClassVar[str] = "edgetok ONNX export manifest"

    @classmethod
    def _check_version(cls, path: Path, data: dict[str, Any]) -> None:
        if data.get("graph_version") != ONNX_GRAPH_VERSION:
            raise EdgetokError(f"{path.parent} was exported by another edgetok version, whose graph this one cannot "
                               "run; export it again")


@dataclass(kw_only=True)
class GgufManifest(_Json):
    """model.gguf.json: what was written (types, the tensors kept at higher precision) and how
    close llama.cpp running it comes to the fp32 reference."""

    edgetok_version: str = __version__
    source: SourceRecord
    format: str = "gguf"
    quant: str  # --quant: the 2-D weights' type
    architecture: str
    method: str  # rtn (llama.cpp's rounding) | gptq | rsq
    quantization: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)  # gptq / rsq: quantize_model's report
    sensitivity_kl: dict[str, float] | None = field(default=None, metadata=_OPTIONAL)  # --keep-sensitive's measurements
    kept_at_higher_precision: dict[str, str]  # HF tensor name → its type
    tensor_types: dict[str, str] | None = field(default=None, metadata=_OPTIONAL)  # --tensor-type's: HF name → type
    size_bytes: int
    # exporters/gguf_types.py's TensorType rows: each tensor's type, and why where not the asked one
    type_plan: list[dict[str, str]] | None = field(default=None, metadata=_OPTIONAL)
    # --quant auto: exporters/allocate.py's Allocation (each matrix's type, and why)
    allocation: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)
    # --imatrix: the file whose importance weighted the rounding ({file, sha256, tensors_weighted})
    imatrix: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)
    sha256: str | None = field(default=None, metadata=_OPTIONAL)  # of the GGUF: a loader refuses a file that differs
    parity: Parity | None = field(default=None, metadata=_OPTIONAL)
    parity_summary: str | None = field(default=None, metadata=_OPTIONAL)

    _READERS: ClassVar = {"source": SourceRecord.from_json, "parity": lambda d: Parity(**d)}
    WHAT: ClassVar[str] = "edgetok GGUF export report"


Manifest = OnnxManifest | GgufManifest
