"""ModelConfig: the architecture facts the reference model needs, read from HF or GGUF metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgetok.errors import EdgetokError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# HF's class per family (config.json's "architectures"); Phi-3's checkpoints fuse q/k/v and gate/up
# (models/checkpoint.py splits them on load and fuses them again to write one)
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# Hugging Face's model_type → edgetok's arch, where they differ.
HF_MODEL_TYPES = {"gemma3_text": "gemma3"}
HIDDEN_ACTS = ("silu", "gelu_tanh")  # SwiGLU (Llama), GeGLU with the tanh approximation (Gemma)
SLIDING, FULL = "sliding_attention", "full_attention"  # layer kinds, in HF's spelling


@dataclass
class ModelConfig:
    arch: str  # one of SUPPORTED_ARCHS
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF form: {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral, Phi-3 (every layer), Gemma 3 (the SLIDING layers)
    qk_norm: bool = False  # an RMSNorm over head_dim on each query and key head before RoPE (Qwen3, Gemma 3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # -- Gemma 3 (defaults: the Llama family) --------------------------------------------------------
    layer_types: list[str] | None = None  # SLIDING or FULL per layer; None: all alike (sliding_window says)
    rope_local_theta: float | None = None  # the RoPE base of SLIDING layers (None: rope_theta)
    sandwich_norms: bool = False  # norms after attention and after the MLP too, before the residual add
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight): Gemma stores weight − 1
    hidden_act: str = "silu"  # one of HIDDEN_ACTS
    embed_scale: bool = False  # embeddings × sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scale is its −½ power (None: head_dim)

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise EdgetokError(
                f"unsupported architecture '{self.arch}': edgetok runs the Llama family "
                f"({', '.join(SUPPORTED_ARCHS)})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise EdgetokError(
                f"unsupported RoPE scaling '{rope_type}' (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise EdgetokError(f"unsupported activation '{self.hidden_act}' (supported: {', '.join(HIDDEN_ACTS)})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}:
                raise EdgetokError(f"invalid config: layer_types must name {SLIDING} or {FULL} for each of the "
                                   f"{self.num_layers} layers")
            if SLIDING in self.layer_types and not self.sliding_window:
                raise EdgetokError("invalid config: sliding_attention layers need a sliding_window")
        if rope_type == "longrope":
            scaling = self.rope_scaling or {}
            for key in ("short_factor", "long_factor"):
                if len(scaling.get(key) or ()) != self.head_dim // 2:
                    raise EdgetokError(f"invalid config: longrope's {key} needs {self.head_dim // 2} values "
                                       f"(head_dim / 2), got {len(scaling.get(key) or ())}")
            if not scaling.get("original_max_position_embeddings"):
                raise EdgetokError("invalid config: longrope needs original_max_position_embeddings")
        if self.num_heads % self.num_kv_heads:
            raise EdgetokError(
                f"invalid config: {self.num_heads} attention heads is not a multiple of "
                f"{self.num_kv_heads} KV heads"
            )

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (keys within the last `window` positions), or None: all keys."""
        if self.layer_types is not None and self.layer_types[layer] == FULL:
            return None
        return self.sliding_window

    @property
    def windows(self) -> list[int | None]:
        """Every layer's window (see window())."""
        return [self.window(i) for i in range(self.num_layers)]

    @property
    def graph_windows(self) -> list[int | None]:
        """Each layer's sliding window as a graph applies it (None: a window as long as the context
        is no window)."""
        return [w if w is not None and w < self.max_context else None for w in self.windows]

    def rope_theta_of(self, layer: int) -> float:
        """The RoPE base of `layer`: Gemma 3's sliding layers have their own."""
        if self.rope_local_theta is not None and self.window(layer) is not None:
            return self.rope_local_theta
        return self.rope_theta

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def n_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        norms = (4 if self.sandwich_norms else 2) * h + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + norms
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + h

    def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face config.json for this architecture (the inverse of from_hf)."""
        model_type = {v: k for k, v in HF_MODEL_TYPES.items()}.get(self.arch, self.arch)
        d: dict[str, Any] = {
            "architectures": [HF_CLASSES[self.arch]],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_context,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids or None,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.arch == "llama":
            d |= {"attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias}
        if self.arch == "qwen3":
            d |= {"attention_bias": self.qkv_bias, "use_sliding_window": False}
        if self.arch in ("mistral", "phi3"):
            d["sliding_window"] = self.sliding_window
        if self.arch == "phi3":
            d["pad_token_id"] = None  # not Phi3Config's default, 32000, which may lie outside the vocabulary
        if self.rope_scaling and self.rope_scaling.get("rope_type") == "longrope":
            # Phi-3 keeps the pretraining context beside the scaling, and it takes priority there
            d["original_max_position_embeddings"] = self.rope_scaling["original_max_position_embeddings"]
        if self.arch == "gemma3":
            d |= self._gemma3_hf()
        return d

    def _gemma3_hf(self) -> dict[str, Any]:
        """Gemma3TextConfig's own fields (both rope spellings: transformers 4.x and 5.x)."""
        local = self.rope_local_theta or self.rope_theta
        full_rope = {"rope_type": "default", "rope_theta": self.rope_theta} | (self.rope_scaling or {})
        return {
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_act": "gelu_pytorch_tanh",
            "sliding_window": self.sliding_window,
            "layer_types": self.layer_types,
            "rope_local_base_freq": local,
            "rope_parameters": {FULL: full_rope, SLIDING: {"rope_type": "default", "rope_theta": local}},
            "query_pre_attn_scalar": _whole(self.query_pre_attn_scalar or self.head_dim),  # (transformers wants an int)
            "attention_bias": self.qkv_bias,
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**d)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face config.json (transformers 4.x and 5.x spellings)."""
        arch = d.get("model_type", "?")
        arch = HF_MODEL_TYPES.get(arch, arch)
        if arch not in SUPPORTED_ARCHS:
            raise EdgetokError(
                f"unsupported architecture '{arch}': edgetok runs the Llama family "
                f"({', '.join(SUPPORTED_ARCHS)})"
            )
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        gemma = _gemma3_from_hf(d, rope) if arch == "gemma3" else {}
        if gemma:
            rope = dict(rope.get(FULL) or d.get("rope_scaling") or {})
        rope_theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("rope_theta", None)
        partial = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise EdgetokError(f"unsupported partial rotary embedding (partial_rotary_factor {partial}): "
                               "edgetok rotates whole heads")
        if rope.get("rope_type") == "su":  # Phi-3's first name for longrope
            rope["rope_type"] = "longrope"
        if rope.get("rope_type") == "longrope" and d.get("original_max_position_embeddings"):
            rope["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        attention_bias = bool(d.get("attention_bias", False))
        sliding = d.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
            sliding = None
        return cls(
            **gemma,
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_context=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or attention_bias,
            o_bias=arch != "qwen2" and attention_bias,  # Qwen3's attention_bias covers o_proj too
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=sliding,
            qk_norm=arch in ("qwen3", "gemma3"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )


def _whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _gemma3_from_hf(d: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """Gemma3TextConfig's fields (transformers 4.x: rope_local_base_freq and a sliding pattern;
    5.x: layer_types and rope_parameters per layer kind)."""
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(cap) is not None:
            raise EdgetokError(f"unsupported Gemma 3 config: {cap} is set (edgetok runs Gemma 3 without soft-capping)")
    if d.get("use_bidirectional_attention"):
        raise EdgetokError("unsupported Gemma 3 config: bidirectional attention (an embedding model, not a decoder)")
    n = d["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    local = (rope.get(SLIDING) or {}).get("rope_theta") or d.get("rope_local_base_freq") or 10000.0
    return {
        "layer_types": list(types),
        "rope_local_theta": float(local),
        "sandwich_norms": True,
        "norm_offset": 1.0,
        "hidden_act": "gelu_tanh",
        "embed_scale": True,
        "query_pre_attn_scalar": float(d.get("query_pre_attn_scalar") or d.get("head_dim") or 256),
    }
