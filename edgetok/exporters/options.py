"""What an export is asked to do, as dataclasses that refuse impossible requests when made.

Field names are the command line's flags (`--block-size` is `block_size`), so `edgetok export`
builds these from its arguments as they are, and messages name an option by its flag: the one
spelling reads for both. Every check is written once, here; the exporters trust their options.

A plain module (no torch): the CLI and the bench import it for the choices it lists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgetok.errors import EdgetokError

METHODS = ("rtn", "gptq", "rsq")  # how weight codes are chosen (exporters/quantize.py)

# --format onnx
AUTO = "auto"  # --quant / --weights: the allocator chooses each matrix's type (exporters/allocate.py)
SOURCE = "source"  # --weights: each matrix keeps a GGUF source's own codes (exporters/gguf_codes.py)
WEIGHTS = ("fp32", "fp16", "int4", "int8", AUTO, SOURCE)
QUANTIZED_WEIGHTS = ("int4", "int8", AUTO, SOURCE)
# --weights auto: the types a matrix can take (MatMulNBits 4 or 8 bits, or float stored in fp16)
ONNX_LADDER = ("int4", "int8", "fp16")
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK = 32
ATTENTION = ("gqa", "standard")
ZERO_POINTS = ("exact", "integer")
HEAD_BITS = (8, 4)
# MatMulNBits' activations in the decoder layers: int8 (ONNX Runtime's integer kernels) or float
ACTIVATIONS = ("int8", "float")
QDQ_OPSET = 21  # int4 and blocked DequantizeLinear
DEFAULT_OPSET = QDQ_OPSET
MIN_OPSET = 18  # the graph's operators

# --format gguf: the 2-D weights' type, named as gguf-py names it in lower case (exporters/gguf.py)
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "iq4_nl", AUTO)
# --quant auto: the types a matrix can take (each falls back as the type plan says where its rows
# are not whole blocks)
# (q4_0 is left out: iq4_nl has its size and a better grid; q4_1 / q5_1 take a source's own grid,
# SmolLM2's published file is q4_1; f16 rounds its input to f16, not to 8 bits)
GGUF_LADDER = ("iq4_nl", "q4_k", "q4_1", "q5_0", "q5_k", "q5_1", "q6_k", "q8_0", "f16")
ALLOCATION_TOKENS = 256  # of the calibration text: the allocator runs the model once per matrix and type
# --quant → (bits, group size) of the codes gptq / rsq write as that type's blocks as they are, on
# a group grid (exporters/quantize.py's gptq); the K-quants and iq4_nl: on the grid exporters/kquants.py fits.
CODE_TYPES = {"q4_0": (4, 32), "q5_0": (5, 32), "q8_0": (8, 32)}
GPTQ_QUANTS = (*CODE_TYPES, "q4_k", "q5_k", "q6_k", "iq4_nl")  # the types gptq / rsq write (with their fallbacks)

MIN_EVAL_TOKENS = 16  # fewer make a parity report of noise


def higher_precision(quant: str) -> str | None:
    """The type --keep-sensitive gives the tensors it keeps (as llama.cpp's _M mixes: q8_0 over
    4/5-bit), or None for a type with nothing above it worth the bytes."""
    return {"q8_0": "f16"}.get(quant, "q8_0" if quant.startswith(("q4", "q5", "q6", "iq4")) else None)


def parse_tensor_type(spec: str) -> tuple[re.Pattern, str]:
    """--tensor-type's REGEX=TYPE → (the compiled REGEX, TYPE), or one sentence."""
    pattern, sep, kind = spec.rpartition("=")
    if not sep or not pattern:
        raise EdgetokError(f"--tensor-type takes REGEX=TYPE (such as attn_v=q8_0), not '{spec}'")
    check_choice(f"type in --tensor-type {spec}:", kind, QUANTS)
    try:
        return re.compile(pattern), kind
    except re.error as e:
        raise EdgetokError(f"--tensor-type {spec}: '{pattern}' is not a regular expression ({e})") from None


def check_choice(flag: str, value, choices) -> None:
    """`value` is one of `choices`, or one sentence naming the option by its flag."""
    if value not in choices:
        raise EdgetokError(f"unknown {flag} '{value}' (choose from {', '.join(map(str, choices))})")


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """Options every format shares (make an OnnxOptions or a GgufOptions). eval_tokens None: the
    format's default."""

    model: str  # "smollm2", a Hugging Face folder or a .gguf file
    output: Path
    force: bool = False
    verify: bool = True  # measure the parity report (False: --no-verify)
    max_kl: float | None = None  # fail, writing nothing, if the report's mean KL exceeds this
    eval_text: Path | None = None  # the parity report's text (default: the built-in essays)
    eval_tokens: int | None = None
    threads: int | None = None
    method: str = "rtn"
    calib: Path | None = None  # gptq / rsq calibration text (default: the built-in essays)
    calib_tokens: int | None = None
    target_bits: float | None = None  # the allocator's budget: bits per weight over the weight matrices

    DEFAULT_EVAL_TOKENS: ClassVar[int]

    def __post_init__(self) -> None:
        if type(self) is ExportOptions:
            raise TypeError("ExportOptions holds what the formats share: make an OnnxOptions or a GgufOptions")
        # Paths given as strings from Python (and a model as a Path); the format's default length.
        object.__setattr__(self, "model", str(self.model))
        for name in ("output", "eval_text", "calib"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.eval_tokens is None:
            object.__setattr__(self, "eval_tokens", self.DEFAULT_EVAL_TOKENS)
        check_choice("--method", self.method, METHODS)
        if not self.reads_calibration_text and (self.calib is not None or self.calib_tokens is not None):
            raise EdgetokError("--calib and --calib-tokens apply to --method gptq and rsq, to the allocator "
                               "(--target-bits, --max-kl with --quant / --weights auto) and to --save-imatrix; "
                               "rtn needs no calibration")
        if self.allocates:
            if (self.target_bits is None) == (self.max_kl is None):
                raise EdgetokError("the allocator (--quant / --weights auto) needs one goal: --target-bits B or --max-kl X")
            if self.calib_tokens is not None and self.calib_tokens < MIN_EVAL_TOKENS:
                raise EdgetokError(f"--calib-tokens must be at least {MIN_EVAL_TOKENS}, not {self.calib_tokens}")
        elif self.target_bits is not None:
            raise EdgetokError("--target-bits is the allocator's budget: use it with --quant auto (gguf) or "
                               "--weights auto (onnx), or leave --quant / --weights unset")
        if self.target_bits is not None and not 1 <= self.target_bits <= 32:
            raise EdgetokError(f"--target-bits must be between 1 and 32 bits per weight, not {self.target_bits}")
        if self.max_kl is not None and not self.verify:
            raise EdgetokError("--max-kl needs the parity report; drop --no-verify")
        if self.eval_tokens < MIN_EVAL_TOKENS:
            raise EdgetokError(f"--eval-tokens must be at least {MIN_EVAL_TOKENS}, not {self.eval_tokens}")
        if self.threads is not None and self.threads < 1:
            raise EdgetokError(f"--threads must be at least 1, not {self.threads}")

    @property
    def reads_eval_text(self) -> bool:
        """Whether the export tokenizes the evaluation text (the parity report needs it)."""
        return self.verify

    @property
    def reads_calibration_text(self) -> bool:
        return self.method != "rtn" or self.allocates

    @property
    def allocates(self) -> bool:
        """Whether the allocator chooses each matrix's type (--quant auto / --weights auto)."""
        raise NotImplementedError  # the format's type option is "auto"

    @property
    def allocation_tokens(self) -> int:
        """Calibration tokens per KL run of the allocator (--calib-tokens is gptq / rsq's when they run)."""
        return self.calib_tokens if self.calib_tokens and self.method == "rtn" else ALLOCATION_TOKENS


@dataclass(frozen=True, kw_only=True)
class OnnxOptions(ExportOptions):
    """`edgetok export --format onnx`: a folder for ONNX Runtime.

    block_size None: 32, or one scale per output channel for int8 with qdq (resolved here).
    attention None: "gqa" (ONNX Runtime's fused kernels), or "standard" with qdq (resolved here).
    prune_after_layer: the layer after which the graph can prune a prompt (None: it cannot).
    zero_points, head_bits: int4 MatMulNBits' zero points and the embedding/head's bits.
    activations: what MatMulNBits multiplies the layers' weights with — int8 (ONNX Runtime's integer
    kernels quantize each block of activations: fastest) or float (the fp32 reference's next
    tokens kept on ≥ 98 % of positions of every text measured, ~15 % slower decode; BENCHMARKS.md).
    The LM head keeps int8 activations either way: its float kernel is ~9× slower per token.
    genai: the folder is for onnxruntime-genai (exporters/genai.py): its inputs and outputs, its
    genai_config.json, standard and com.microsoft operators only.
    """

    weights: str | None = None  # None: int4, or auto with --target-bits
    block_size: int | None = None
    qdq: bool = False  # standard DequantizeLinear + MatMul only (NPU execution providers)
    zero_points: str = "exact"
    head_bits: int = 8
    activations: str = "int8"
    opset: int = DEFAULT_OPSET
    attention: str | None = None
    prune_after_layer: int | None = None
    genai: bool = False

    DEFAULT_EVAL_TOKENS: ClassVar[int] = 1024

    def __post_init__(self) -> None:
        if self.weights is None:
            object.__setattr__(self, "weights", AUTO if self.target_bits is not None else "int4")
        check_choice("--weights", self.weights, WEIGHTS)
        super().__post_init__()
        quantized = self.weights in QUANTIZED_WEIGHTS
        if self.qdq and self.weights not in ("int4", "int8"):
            raise EdgetokError("--qdq applies to --weights int4 or int8")
        if self.weights == SOURCE and (self.qdq or self.block_size is not None or self.method != "rtn"):
            raise EdgetokError("--weights source carries the GGUF's own blocks and codes: --qdq, --block-size and "
                               "--method apply to --weights int4 or int8")
        if self.block_size is not None and (not quantized or self.block_size not in BLOCK_SIZES):
            raise EdgetokError(f"--block-size takes one of {', '.join(map(str, BLOCK_SIZES))}, with --weights int4 or int8")
        if self.opset < MIN_OPSET:
            raise EdgetokError(f"--opset {self.opset} is too old: the graph needs opset {MIN_OPSET} or newer")
        if self.qdq and self.opset < QDQ_OPSET:
            raise EdgetokError(f"--qdq needs --opset {QDQ_OPSET} or newer (blocked and int4 DequantizeLinear), not {self.opset}")
        if self.method != "rtn" and self.weights not in ("int4", "int8"):
            raise EdgetokError(f"--method {self.method} applies to --weights int4 or int8 (the allocator, --weights auto, "
                               "rounds each matrix to nearest)")
        if self.attention is None:
            object.__setattr__(self, "attention", "standard" if self.qdq else "gqa")
        check_choice("--attention", self.attention, ATTENTION)
        if self.qdq and self.attention != "standard":
            raise EdgetokError("--qdq graphs use standard operators only: drop --attention gqa")
        if self.zero_points not in ZERO_POINTS or self.head_bits not in HEAD_BITS:
            raise EdgetokError("--zero-points takes exact or integer, --head-bits 8 or 4")
        if (self.zero_points != "exact" or self.head_bits != 8) and (self.weights != "int4" or self.qdq or self.method != "rtn"):
            raise EdgetokError("--zero-points and --head-bits apply to --weights int4 MatMulNBits (no --qdq) rounded with --method rtn")
        check_choice("--activations", self.activations, ACTIVATIONS)
        if self.activations != "int8" and (not quantized or self.qdq):
            raise EdgetokError("--activations applies to --weights int4 or int8 MatMulNBits (no --qdq)")
        if self.prune_after_layer is not None and self.prune_after_layer < 0:
            raise EdgetokError(f"--prune-after-layer must be 0 or more, not {self.prune_after_layer}")
        if self.genai:
            # onnxruntime-genai drives only what its cache feeds: one KV buffer per layer that
            # GroupQueryAttention writes in place, no pruning inputs
            if self.attention != "gqa":
                raise EdgetokError("--genai graphs keep onnxruntime-genai's KV cache in GroupQueryAttention: "
                                   "drop --qdq and --attention standard")
            if self.prune_after_layer is not None:
                raise EdgetokError("--genai graphs cannot prune prompts (onnxruntime-genai feeds no pruning inputs): "
                                   "drop --prune-after-layer")
        if quantized and self.weights != SOURCE and self.block_size is None and not (self.qdq and self.weights == "int8"):
            object.__setattr__(self, "block_size", DEFAULT_BLOCK)

    @property
    def quantized(self) -> bool:
        return self.weights in QUANTIZED_WEIGHTS

    @property
    def allocates(self) -> bool:
        return self.weights == AUTO


@dataclass(frozen=True, kw_only=True)
class GgufOptions(ExportOptions):
    """`edgetok export --format gguf`: a file llama.cpp runs, and its report beside it.

    quant: the 2-D weights' type (gptq / rsq write their codes on its grid: GPTQ_QUANTS).
    keep_sensitive: the tensors quantization hurts most (measured) at a higher type.
    """

    quant: str | None = None  # None: q8_0, or auto with --target-bits
    keep_sensitive: bool = False
    tensor_type: tuple[str, ...] = ()  # REGEX=TYPE: the matrices whose llama.cpp name REGEX finds get TYPE
    imatrix: Path | None = None  # llama.cpp's importance matrix: weights the K-quant / iq4_nl rounding
    save_imatrix: Path | None = None  # where to write the importance edgetok calibrates (.dat: legacy layout)

    DEFAULT_EVAL_TOKENS: ClassVar[int] = 512

    def __post_init__(self) -> None:
        if self.quant is None:
            object.__setattr__(self, "quant", AUTO if self.target_bits is not None else "q8_0")
        check_choice("--quant", self.quant, QUANTS)
        super().__post_init__()
        object.__setattr__(self, "tensor_type", tuple(self.tensor_type))
        for spec in self.tensor_type:  # the form here; the names when the model is loaded (exporters/gguf.py)
            parse_tensor_type(spec)
        if self.method != "rtn" and not self.allocates and self.quant not in GPTQ_QUANTS:
            raise EdgetokError(
                f"--method {self.method} writes its codes on the grid of {', '.join(GPTQ_QUANTS)}; "
                f"use one of them as --quant, or --method rtn for {self.quant}"
            )
        for name in ("imatrix", "save_imatrix"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.imatrix is not None and self.method != "rtn":
            raise EdgetokError(f"--imatrix weights round-to-nearest; --method {self.method} weighs errors by its own "
                               "calibration")
        if self.save_imatrix is not None and self.save_imatrix.resolve() == self.output.resolve():
            raise EdgetokError("--save-imatrix needs a file of its own, not --output")
        if self.keep_sensitive and self.allocates:
            raise EdgetokError("--keep-sensitive keeps a few matrices above one --quant; with --quant auto the "
                               "allocator already chooses every matrix's type from its sensitivity")
        if self.keep_sensitive and higher_precision(self.quant) is None:
            raise EdgetokError(f"--keep-sensitive needs a quantized --quant (q8_0, q4_*, q5_*, q6_k, iq4_nl), not {self.quant}")

    @property
    def reads_eval_text(self) -> bool:
        """--keep-sensitive measures each tensor's sensitivity on the evaluation text too."""
        return self.verify or self.keep_sensitive

    @property
    def allocates(self) -> bool:
        return self.quant == AUTO

    @property
    def reads_calibration_text(self) -> bool:
        return super().reads_calibration_text or self.save_imatrix is not None
