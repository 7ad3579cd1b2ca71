"""The llama.cpp backend: a GGUF run by llama-cpp-python, with llama.cpp's own KV cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.models.sources import Source

# --kv-type → ggml type id of llama.cpp's K/V cache
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
KV_BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # ggml blocks: 32 values + an f16 scale
INSTALL_HINT = "llama-cpp-python is not installed; run `make install` (it builds it with the flags this machine needs)"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise EdgetokError(INSTALL_HINT) from None
    return llama_cpp


def open_gguf(path: Path, n_ctx: int, threads: int | None, kv_type: str = "f16", logits_all: bool = False):
    if kv_type not in KV_TYPES:
        raise EdgetokError(f"unknown --kv-type '{kv_type}' (choose from {', '.join(KV_TYPES)})")
    llama_cpp = _llama_cpp()
    try:
        return llama_cpp.Llama(
            str(path),
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            type_k=KV_TYPES[kv_type],
            type_v=KV_TYPES[kv_type],
            flash_attn=kv_type != "f16",  # llama.cpp quantizes the V cache only with flash attention
            logits_all=logits_all,
            verbose=False,
        )
    except ValueError as e:
        raise EdgetokError(f"llama.cpp could not load {path}: {e}") from None


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, source: Source, threads: int | None = None, kv_type: str = "f16", n_ctx: int | None = None) -> None:
        if source.format != "gguf":
            raise EdgetokError("--backend llamacpp runs GGUF files; export one with `edgetok export MODEL --format gguf`")
        self.config = source.config
        self.kv_type = kv_type
        self.llm = open_gguf(source.path, n_ctx or source.config.max_context, threads, kv_type)
        self._n_vocab = self.llm.n_vocab()

    def new_cache(self):
        """llama.cpp keeps one sequence's KV inside its context: the handle is the context itself."""
        self.llm.reset()
        return self.llm

    def forward(self, tokens: list[int], cache) -> torch.Tensor:
        cache.eval(tokens)  # drops any KV past n_tokens first, then appends
        logits = np.ctypeslib.as_array(cache._ctx.get_logits_ith(-1), shape=(self._n_vocab,))
        return torch.from_numpy(logits.copy())

    def truncate(self, cache, n: int) -> int:
        cache.n_tokens = n
        return n

    def end_prefill(self, cache) -> None:
        pass

    def cache_stats(self, cache) -> dict:
        # llama.cpp allocates K and V for its whole context window when the context is created.
        resident = round(self.config.kv_bytes_per_token(1) * cache.n_ctx() * KV_BYTES_PER_VALUE[self.kv_type])
        return {"kind": f"llama.cpp ({self.kv_type})", "resident_bytes": {"device": resident}}


def llamacpp_logits(path: Path, tokens: list[int], threads: int | None = None) -> torch.Tensor:
    """Logits (T, V) at every position of `tokens`, computed by llama.cpp from the GGUF at `path`."""
    llm = open_gguf(path, len(tokens), threads, logits_all=True)
    try:
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    finally:
        llm.close()
