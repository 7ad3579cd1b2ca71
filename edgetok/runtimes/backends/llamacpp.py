"""The llama.cpp backend: a GGUF run by llama-cpp-python, with llama.cpp's own KV cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.fidelity import weights_effect
from edgetok.models.sources import Source
from edgetok.runtimes.backends.base import ROLLBACK

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
    # llama.cpp's cache is its own: no pruning, no prefix export; it drops any tokens past n_tokens
    capabilities = frozenset({ROLLBACK})
    min_draft = 1  # (its cost curve is not measured)
    node_cost = 1.0  # (no TREE)
    prune_after_layer = None

    def __init__(self, source: Source, threads: int | None = None, kv_type: str = "f16", n_ctx: int | None = None) -> None:
        if source.format != "gguf":
            raise EdgetokError("--backend llamacpp runs GGUF files; export one with `edgetok export MODEL --format gguf`")
        self.config = source.config
        self.weights_fidelity = weights_effect(source, "as stored")
        self.kv_type = kv_type
        self.llm = open_gguf(source.path, n_ctx or source.config.max_context, threads, kv_type)
        self._n_vocab = self.llm.n_vocab()

    def new_cache(self, kv=None):
        """llama.cpp keeps one sequence's KV inside its context: the handle is the context itself."""
        if kv is not None:
            raise EdgetokError("the tiered KV cache applies to the torch and onnxruntime backends, not llama.cpp")
        self.llm.reset()
        return self.llm

    def forward(self, tokens: list[int], cache, last: int = 1) -> np.ndarray:
        """(last, V) float32. llama-cpp-python's eval() asks llama.cpp for the last token's logits
        only (or for every token's, with a context-sized score matrix made at load); for several,
        this runs its batches itself, flagging just the positions wanted."""
        if last == 1:
            cache.eval(tokens)  # drops any KV past n_tokens first, then appends
            return self._row(cache, -1)[None].copy()
        cache._ctx.kv_cache_seq_rm(-1, cache.n_tokens, -1)
        first, rows = len(tokens) - last, []
        for start in range(0, len(tokens), cache.n_batch):
            piece = tokens[start : start + cache.n_batch]
            batch = cache._batch
            batch.set_batch(batch=piece, n_past=cache.n_tokens, logits_all=False)
            for j in range(len(piece)):
                batch.batch.logits[j] = start + j >= first
            cache._ctx.decode(batch)
            cache.input_ids[cache.n_tokens : cache.n_tokens + len(piece)] = piece
            cache.n_tokens += len(piece)
            rows += [self._row(cache, j).copy() for j in range(len(piece)) if start + j >= first]
        return np.stack(rows)

    def _row(self, cache, j: int) -> np.ndarray:
        """The logits of the last decode's j-th batch position, in llama.cpp's memory (V,)."""
        return np.ctypeslib.as_array(cache._ctx.get_logits_ith(j), shape=(self._n_vocab,))

    def forward_batch(self, tokens: list[int], caches: list) -> np.ndarray:
        raise EdgetokError("the llama.cpp backend keeps one sequence; batched decoding needs an ONNX export")

    def forward_tree(self, tree, cache) -> np.ndarray:
        raise EdgetokError("draft trees (--draft-width above 1) need the torch backend or the default engine; "
                           "llama.cpp verifies chains")

    def keep_branch(self, cache, tree, branch: list[int]) -> None:
        self.forward_tree(tree, cache)

    def truncate(self, cache, n: int) -> int:
        cache.n_tokens = n
        return n

    def end_prefill(self, cache) -> None:
        pass

    def prefill_pruned(self, tokens, cache, plan, chunk, progress=None):
        raise EdgetokError("--prune-prompt works with the torch and onnxruntime backends, not llama.cpp")

    def save_prefix(self, cache):
        raise EdgetokError("--kv-store works with the torch and onnxruntime backends, not llama.cpp")

    def load_prefix(self, cache, state) -> None:
        raise EdgetokError("--kv-store works with the torch and onnxruntime backends, not llama.cpp")

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
