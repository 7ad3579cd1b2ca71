"""GGUF files of the Llama family: llama.cpp's names and layouts ↔ edgetok's (HF-named) tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetok.errors import EdgetokError
from edgetok.models.config import FULL, SLIDING, ModelConfig
from edgetok.models.names import (
    FUSED,
    GGUF_ROPE_FACTORS,
    GGUF_STACKED,
    K_NORM,
    K_PROJ,
    LM_HEAD,
    O_PROJ,
    Q_PROJ,
    gguf_name,
    hf_name,
    is_norm,
    layer,
)

if TYPE_CHECKING:  # (reading the weights needs torch; checking a file's kind does not)
    import torch

GGUF_MAGIC = b"GGUF"
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "gemma3")  # Mistral GGUFs say "llama"
NEOX_ARCHS = ("qwen2", "qwen3", "phi3", "gemma3")  # llama.cpp rotates their heads' halves, as HF does: no permutation

# What llama.cpp assumes of Gemma 3 without metadata (llama-model.cpp): every 6th layer is global,
# the sliding layers' RoPE base is 10000 and unscaled, and the 27B model (62 layers) scales queries
# by hidden / heads rather than head_dim.
GEMMA3_SWA_PATTERN, GEMMA3_LOCAL_THETA, GEMMA3_27B_LAYERS = 6, 10000.0, 62


def gguf_arch(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name for cfg's family."""
    return cfg.arch if cfg.arch in GGUF_ARCHS else "llama"


def stacked_name(cfg: ModelConfig, hf: str) -> str | None:
    """The fused HF name ("...mlp.gate_up_proj.weight") whose tensor llama.cpp's `cfg` architecture
    stores in place of part `hf`, or None when it stores `hf` as it is."""
    for fused in GGUF_STACKED.get(gguf_arch(cfg), ()):
        for part in FUSED[fused]:
            if f".{part}." in hf:
                return hf.replace(part, fused)
    return None


def stacked_gguf_name(fused: str) -> str:
    """llama.cpp's name of a stacked tensor: its last part's (phi3's gate_up → ffn_up)."""
    return gguf_name(next(fused.replace(f, parts[-1]) for f, parts in FUSED.items() if f".{f}." in fused))


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF → llama.cpp: llama.cpp's rope pairs adjacent dims, HF's pairs the two halves of a head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp → HF: the inverse of permute_qk."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permuted_heads(hf: str, cfg: ModelConfig) -> int | None:
    """The heads in the rows of tensor `hf` when llama.cpp stores them permuted (permute_qk): the
    q and k projections of every architecture llama.cpp reads as "llama"; None for the rest."""
    if gguf_arch(cfg) in NEOX_ARCHS:
        return None
    return cfg.num_heads if f".{Q_PROJ}." in hf else cfg.num_kv_heads if f".{K_PROJ}." in hf else None


def check_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def read_metadata(reader) -> dict[str, Any]:
    meta = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = fld.contents()
    return meta


def config_from_gguf(
    meta: dict[str, Any], tensor_names: set[str], rope_factors: dict[str, list[float]] | None = None
) -> ModelConfig:
    """rope_factors: longrope's {"long_factor": [...], "short_factor": [...]} read from the file's tensors."""
    arch = meta.get("general.architecture", "?")
    if arch not in GGUF_ARCHS:
        raise EdgetokError(f"unsupported architecture '{arch}' in GGUF: edgetok runs the Llama family ({', '.join(GGUF_ARCHS)})")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise EdgetokError(f"the GGUF lacks the metadata key {arch}.{key}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    rope_scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif rope_factors:  # llama.cpp writes no scaling type for them
        rope_scaling = {"rope_type": "longrope", **rope_factors,
                        "original_max_position_embeddings": get("rope.scaling.original_context_length"),
                        "attention_factor": float(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0))}
    elif scaling_type not in ("none", None):
        raise EdgetokError(f"unsupported RoPE scaling '{scaling_type}' in GGUF")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    head_dim = meta.get(f"{arch}.attention.key_length") or hidden // heads
    gemma = _gemma3_fields(meta, get, hidden // heads, head_dim) if arch == "gemma3" else {}
    return ModelConfig(
        **gemma,
        arch=arch,
        vocab_size=meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_context=get("context_length"),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings=gguf_name(LM_HEAD) not in tensor_names,
        qkv_bias=gguf_name(layer(0, f"{Q_PROJ}.bias")) in tensor_names,
        o_bias=gguf_name(layer(0, f"{O_PROJ}.bias")) in tensor_names,
        qk_norm=gguf_name(layer(0, f"{K_NORM}.weight")) in tensor_names,
        sliding_window=meta.get(f"{arch}.attention.sliding_window") or None,
        bos_token_id=bos,
        eos_token_ids=list(dict.fromkeys(eos)),
    )


def _gemma3_fields(meta: dict[str, Any], get: Callable, width_per_head: int, head_dim: int) -> dict[str, Any]:
    n = get("block_count")
    pattern = meta.get("gemma3.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
    return {
        "layer_types": [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)],
        "rope_local_theta": GEMMA3_LOCAL_THETA,
        "sandwich_norms": True,
        "norm_offset": 1.0,
        "hidden_act": "gelu_tanh",
        "embed_scale": True,
        "query_pre_attn_scalar": float(width_per_head if n == GEMMA3_27B_LAYERS else head_dim),
    }


def open_gguf(path: Path):
    """A GGUF file → (gguf-py's reader, its metadata, its ModelConfig). Raises EdgetokError on bad files."""
    from gguf import GGUFReader

    if not check_magic(path):
        raise EdgetokError(f"{path} is not a GGUF file (bad magic bytes)")
    try:
        reader = GGUFReader(path)
        meta = read_metadata(reader)
    except Exception as e:  # the gguf package raises assorted errors on damaged files
        raise EdgetokError(f"{path} is a damaged GGUF file (truncated or corrupt: {e})") from None
    names = {t.name for t in reader.tensors}
    factors = {key: [float(x) for x in t.data] for t in reader.tensors for key, gg in GGUF_ROPE_FACTORS.items()
               if t.name == gg}
    return reader, meta, config_from_gguf(meta, names, factors)


def named_tensors(path: Path, reader, cfg: ModelConfig, progress: Callable | None = None):
    """(HF name, reader tensor, HF shape) for each of the file's tensors but the RoPE factors (in the
    config); a tensor llama.cpp stacks (phi3's ffn_up: gate and up) comes under its fused name."""
    items = progress(reader.tensors, len(reader.tensors)) if progress else reader.tensors
    for t in items:
        if t.name in GGUF_ROPE_FACTORS.values():
            continue
        name = hf_name(t.name, cfg.sandwich_norms)
        if name is not None and stacked_name(cfg, name):
            name = stacked_name(cfg, name)
        if name is None:
            raise EdgetokError(f"{path}: unexpected tensor '{t.name}' for a {cfg.arch} model")
        yield name, t, tuple(int(d) for d in reversed(t.shape))


def read_gguf(path: Path, progress: Callable | None = None):
    """Read a GGUF → (config, HF-named fp32 weights, metadata, info). Raises EdgetokError on bad files.

    `progress(iterable, total)` wraps the per-tensor loop (a progress bar).
    """
    import torch
    from gguf.quants import dequantize

    from edgetok.models.checkpoint import split_fused

    reader, meta, cfg = open_gguf(path)
    qtypes: dict[str, int] = {}
    weights: dict[str, torch.Tensor] = {}
    for name, t, shape in named_tensors(path, reader, cfg, progress):
        try:
            w = dequantize(t.data, t.tensor_type).reshape(shape)
        except Exception as e:
            raise EdgetokError(f"{path} is a damaged GGUF file (tensor {t.name}: {e})") from None
        heads = permuted_heads(name, cfg)
        if heads is not None:
            w = unpermute_qk(w, heads)
        if cfg.norm_offset and is_norm(name):  # llama.cpp stores Gemma's norms as offset + weight
            w = w - np.float32(cfg.norm_offset)
        weights[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: the reader maps the file read-only
        qtypes[t.tensor_type.name] = qtypes.get(t.tensor_type.name, 0) + 1
    weights = split_fused(weights, cfg)
    info = {
        "format": "gguf",
        "name": meta.get("general.name"),
        "file_type": meta.get("general.file_type"),
        "tensor_types": qtypes,
    }
    return cfg, weights, meta, info
