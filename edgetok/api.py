"""The Python API: `edgetok.load(ref)` → Model with generate / stream / chat."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from edgetok.errors import EdgetokError
from edgetok.models.sources import Source, load_source
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.engine import Engine, GenerationConfig, Result, Stream
from edgetok.runtimes.kv import KVConfig

Messages = list[dict[str, str]]


class Model:
    """A loaded model ready to generate. Not thread-safe: one generation at a time."""

    def __init__(self, source: Source, engine: Engine) -> None:
        self.source = source
        self.engine = engine
        self.config = source.config
        self.tokenizer = source.tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    def encode(self, prompt: str | Messages, chat: bool) -> list[int]:
        """A prompt → token ids; with chat, a string becomes one user message through the template."""
        if chat or not isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            # The template writes any BOS itself.
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def stream(
        self,
        prompt: str | Messages,
        config: GenerationConfig | None = None,
        *,
        chat: bool = False,
        progress: Callable[[int], None] | None = None,
        **options,
    ) -> Stream:
        """Text pieces as they are generated; the Stream's `.result` is set at the end."""
        cfg = config or GenerationConfig(**options)
        return Stream(self.engine.generate_ids(self.encode(prompt, chat), cfg, progress))

    def generate(self, prompt: str | Messages, config: GenerationConfig | None = None, *, chat: bool = False, **options) -> Result:
        stream = self.stream(prompt, config, chat=chat, **options)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def chat(self, messages: Messages, config: GenerationConfig | None = None, **options) -> Result:
        return self.generate(messages, config, chat=True, **options)


BACKENDS = ("torch", "llamacpp", "onnxruntime")


def load(
    ref: str,
    *,
    backend: str | None = None,
    provider: str = "cpu",
    weights: str = "fp32",
    threads: int | None = None,
    kv_type: str | None = None,
    kv: KVConfig | None = None,
    kv_store: str | Path | None = None,
    kv_store_rebuild: bool = False,
    progress: bool = False,
) -> Model:
    """Load "smollm2", a Hugging Face folder, a .gguf file or an ONNX export folder.

    backend: "torch" (edgetok's reference model and KV caches), "llamacpp" (a GGUF through
    llama-cpp-python; kv_type f16 | q8_0 | q4_0 sets its K/V cache type) or "onnxruntime" (an ONNX
    export, with edgetok's KV caches; provider picks the execution provider). None: onnxruntime
    for an ONNX export, torch otherwise.
    weights: the torch backend's weights — fp32 (exact reference), bf16, or int8 (weight-only).
    kv: the tiered KV cache's budget and tiers (torch backend); None keeps every token exact in RAM.
    kv_store: a folder where prompts' K/V persist, so a later process skips their prefill;
    kv_store_rebuild recomputes entries that are damaged or from another format instead of failing.
    """
    if backend is not None and backend not in BACKENDS:
        raise EdgetokError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if threads is not None:
        if threads < 1:
            raise EdgetokError("threads must be ≥ 1")
        torch.set_num_threads(threads)
    source = load_source(ref, progress=progress)
    if backend is None:
        backend = "onnxruntime" if source.format == "onnx" else "torch"
    if (backend == "onnxruntime") != (source.format == "onnx"):
        if source.format == "onnx":
            raise EdgetokError(f"{source.path} is an ONNX export: it runs on --backend onnxruntime")
        raise EdgetokError("--backend onnxruntime runs an ONNX folder made by `edgetok export --format onnx`")
    if backend != "torch":
        # torch only keeps the books here; its idle OpenMP workers would spin against the runtime's
        # own threads for the same cores
        torch.set_num_threads(1)
    if backend == "onnxruntime":
        from edgetok.runtimes.backends.onnxruntime import OnnxBackend

        if kv_type is not None or weights != "fp32":
            raise EdgetokError("an ONNX export carries its own weights; --weights and --kv-type do not apply to it")
        engine_backend = OnnxBackend(source, provider=provider, threads=threads, kv=kv)
    elif backend == "llamacpp":
        from edgetok.runtimes.backends.llamacpp import LlamaCppBackend

        if kv is not None or kv_store is not None or weights != "fp32":
            raise EdgetokError("--weights, the tiered KV cache and --kv-store apply to the torch backend, not llama.cpp")
        engine_backend = LlamaCppBackend(source, threads=threads, kv_type=kv_type or "f16")
    else:
        if kv_type is not None:
            raise EdgetokError("--kv-type sets llama.cpp's cache; use it with --backend llamacpp")
        if weights not in TorchBackend.WEIGHTS:
            raise EdgetokError(f"unknown weights '{weights}' (choose from {', '.join(TorchBackend.WEIGHTS)})")
        engine_backend = TorchBackend(source, weights=weights, kv=kv)
    store_factory = None
    if kv_store is not None:
        from edgetok.runtimes.kv.store import PromptStore

        def store_factory(cache):
            return PromptStore(Path(kv_store), source.fingerprint, cache.kv_dtype, rebuild=kv_store_rebuild)

    return Model(source, Engine(engine_backend, source.tokenizer, store_factory))
