"""The reference torch model of the Llama family: Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3, SmolLM.

Parameter names follow Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so an
HF state dict loads as is and a GGUF is renamed into the same form. K/V live in a cache object
(see runtimes/kv): the model computes, the cache decides what attention sees.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgetok.models.config import ModelConfig
from edgetok.runtimes.kv import KVCache


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with the config's scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "longrope":  # per-frequency divisors: the long ones when the context exceeds pretraining's
        factors = scaling["long_factor" if longrope_long(cfg) else "short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
    return inv_freq


def longrope_long(cfg: ModelConfig) -> bool:
    """Whether longrope uses its long factors: chosen once for the context the model is run at
    (max_context), as llama.cpp chooses them for its n_ctx. transformers chooses per forward by the
    sequence's length, which agrees whenever the sequence is on the same side of the pretraining
    context."""
    return cfg.max_context > cfg.rope_scaling["original_max_position_embeddings"]


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor RoPE's cos and sin are multiplied by (longrope: sqrt(1 + ln s / ln original),
    s = max_context / original, unless the config names it); 1 for the other kinds."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or cfg.max_context / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) → cos, sin (T, head_dim), in HF's half-split layout, times `scale`
    (rope_attention_factor)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=cfg.o_bias)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one matmul, once fused (int8 weights)
        if cfg.qk_norm:  # over each head's D values, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def project(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, hidden) → q (B, Hq, T, D), k, v (B, Hkv, T, D); q and k rotated to their positions."""
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
            q, k, v = self.qkv_proj(x).split(sizes, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, layer: int, cache: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        out = cache.attend(layer, q, k, v)  # (B, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matmul, once fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, layer: int, cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.rope_scale = rope_attention_factor(cfg)

    @classmethod
    def from_state_dict(
        cls, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
        int8: bool = False,
    ) -> LlamaModel:
        """Build on the meta device and take the tensors as they are (no copy when dtypes match).

        int8: weight-only int8 linears with bf16 activations (dtype is then bf16).
        """
        target = dtype
        if int8:  # quantize from the float32 weights, then take the rest (norms, embedding) to bf16
            dtype, target = torch.float32, torch.bfloat16
        with torch.device("meta"):
            model = cls(cfg)
        weights = dict(weights)
        if cfg.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        # llama.cpp's per-frequency RoPE divisors (Llama 3 GGUFs carry them as a tensor).
        freq_factors = weights.pop("rope_freqs", None)
        weights = {k: v.to(dtype) for k, v in weights.items()}
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        if int8:
            from edgetok.kernels.linear import Int8Linear, int8_linears

            int8_linears(model)
            # Per-row scales make concatenation along outputs exact: fewer, larger matmuls per layer
            # (≈7 % faster decode, measured at 1K in-process, interleaved).
            for block in model.model.layers:
                a, m = block.self_attn, block.mlp
                a.qkv_proj = Int8Linear.concat([a.q_proj, a.k_proj, a.v_proj])
                m.gate_up_proj = Int8Linear.concat([m.gate_proj, m.up_proj])
                del a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj
            model.to(target)
        inv_freq = rope_inv_freq(cfg)  # float32 whatever the weights: positions need the precision
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.float()
        model.inv_freq = inv_freq
        return model.eval()

    # The pieces of a forward pass, for callers that run some layers on some tokens (prompt pruning).
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) → hidden states (B, T, hidden)."""
        return self.model.embed_tokens(tokens)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) → cos, sin (T, head_dim) in the activations' dtype."""
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_scale)
        return cos.to(dtype), sin.to(dtype)

    def run_layers(self, x, cos, sin, cache: KVCache, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Layers start..stop-1 over x (B, T, hidden), storing their K/V in `cache`."""
        stop = len(self.model.layers) if stop is None else stop
        for i in range(start, stop):
            x = self.model.layers[i](x, cos, sin, i, cache)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., hidden) → float32 logits (..., V)."""
        return self.lm_head(self.model.norm(x)).float()

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        last: int | None = 1,
    ) -> torch.Tensor:
        """tokens (B, T) → logits (B, last, V) of the last `last` tokens; last=None: (B, T, V), all.

        positions (T,): each token's position; by default the ones after what the cache has seen.
        """
        if positions is None:
            positions = torch.arange(cache.length, cache.length + tokens.shape[1])
        x = self.embed(tokens)
        cos, sin = self.rope(positions, x.dtype)
        x = self.run_layers(x, cos, sin, cache)
        return self.head(x if last is None else x[:, -last:])
