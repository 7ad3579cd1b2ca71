"""The Python API: `edgetok.load(ref)` → Model with generate / stream / chat."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path

from edgetok.errors import EdgetokError
from edgetok.models.sources import ONNX_FORMATS, OPTIMUM, Source, load_source
from edgetok.runtimes.backends.base import CACHE_ATTENTION
from edgetok.runtimes.choice import TORCH_WEIGHTS, EngineChoice, LongPrompts, auto_backend, follow_plan
from edgetok.runtimes.engine import Engine, GenerationConfig, Result, Stream
from edgetok.runtimes.kv import KVConfig

Messages = list[dict[str, str]]


class Model:
    """A loaded model ready to generate.

    Safe to share between threads: its calls are serialized, one generation at a time (the model
    keeps one KV cache). generate and chat wait for a running generation; a stream holds the model
    from its first piece until it is exhausted, closed, or its loop is left — so iterate a stream
    to the end or close it (`with model.stream(...) as s:`). In the thread that holds an unfinished
    stream, starting another generation is refused with EdgetokError: it would wait for itself.
    """

    def __init__(self, source: Source, engine: Engine, choice: EngineChoice | None = None) -> None:
        self.source = source
        self.engine = engine
        self.choice = choice  # which engine runs, and why
        self.config = source.config
        self.tokenizer = source.tokenizer
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread generating now

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    def encode(self, prompt: str | Messages, chat: bool) -> list[int]:
        """A prompt → token ids; with chat, a string becomes one user message through the template."""
        check_prompt(prompt)
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
        cancel: threading.Event | None = None,
        **options,
    ) -> Stream:
        """Text pieces as they are generated; the Stream's `.result` is set at the end.

        cancel: an Event another thread may set: the generation ends before its next token, with
        finish_reason "cancelled" (closing the stream ends it too, without a result)."""
        cfg = _generation_config(config, options)
        if cancel is not None and not isinstance(cancel, threading.Event):
            raise EdgetokError(f"cancel must be a threading.Event, not {type(cancel).__name__}")
        asked = cancel.is_set if cancel is not None else None
        # a generator: nothing runs until the stream's first piece is asked for
        return Stream(self._serialized(self.engine.generate_ids(self.encode(prompt, chat), cfg, progress, cancel=asked)))

    def generate(self, prompt: str | Messages, config: GenerationConfig | None = None, *, chat: bool = False,
                 cancel: threading.Event | None = None, **options) -> Result:
        with self.stream(prompt, config, chat=chat, cancel=cancel, **options) as stream:
            for _ in stream:
                pass
        assert stream.result is not None
        return stream.result

    def chat(self, messages: Messages, config: GenerationConfig | None = None, *, cancel: threading.Event | None = None,
             **options) -> Result:
        return self.generate(messages, config, chat=True, cancel=cancel, **options)

    def reset(self) -> None:
        """Forget the last sequence (its KV cache): the next prompt is prefilled from its start."""
        with self._held():
            self.engine.reset()

    @contextmanager
    def _held(self):
        me = threading.get_ident()
        if self._holder == me:
            raise EdgetokError("this thread is still iterating a stream of this model; iterate it to the end or "
                               "close it before the next call")
        with self._lock:
            self._holder = me
            try:
                yield
            finally:
                self._holder = None

    def _serialized(self, pieces: Generator) -> Generator:
        """The engine's generator, run while this thread holds the model."""
        with self._held():
            try:
                yield from pieces  # a close() of this generator closes `pieces` at its current token
            except BaseException as e:
                if not isinstance(e, GeneratorExit):
                    self.engine.reset()  # stopped inside a step (Ctrl-C, an error): the cache may hold half of it
                raise


def check_prompt(prompt) -> None:
    """A prompt is a string, or a list of {"role": str, "content": str} messages, of valid text."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                          and isinstance(m.get("content"), str) for m in prompt):
        texts = [t for m in prompt for t in (m["role"], m["content"])]
    else:
        raise EdgetokError('a prompt is a string or a list of messages ({"role": "user", "content": "…"})')
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: what Python makes of bytes that were not UTF-8
            raise EdgetokError("the prompt is not valid text (it holds bytes that are not UTF-8); pass UTF-8 text") from None


def _generation_config(config: GenerationConfig | None, options: dict) -> GenerationConfig:
    if config is not None and not isinstance(config, GenerationConfig):
        raise EdgetokError(f"config must be an edgetok.GenerationConfig, not {type(config).__name__}")
    if config is not None and options:
        raise EdgetokError(f"give either config or keyword options ({', '.join(options)}), not both")
    known = [f.name for f in dataclasses.fields(GenerationConfig)]
    if unknown := [name for name in options if name not in known]:
        raise EdgetokError(f"unknown generation option {', '.join(unknown)} (known: {', '.join(known)})")
    return config or GenerationConfig(**options)


BACKENDS = ("torch", "llamacpp", "onnxruntime")
MAX_THREADS = 4096  # beyond what any machine has; torch takes a 32-bit count


def load(
    ref: str | os.PathLike,
    *,
    backend: str | None = None,
    provider: str | None = None,
    weights: str = "fp32",
    threads: int | None = None,
    kv_type: str | None = None,
    kv: KVConfig | None = None,
    kv_store: str | Path | None = None,
    kv_store_rebuild: bool = False,
    progress: bool = False,
    needs: frozenset[str] = frozenset(),
    max_memory_bytes: int | None = None,
    plan=None,
) -> Model:
    """Load "smollm2", a Hugging Face folder, a .gguf file or an ONNX export folder.

    backend: "torch" (edgetok's reference model and KV caches: the exact fp32 reference), "llamacpp"
    (a GGUF through llama-cpp-python; kv_type f16 | q8_0 | q4_0 sets its K/V cache type) or
    "onnxruntime" (an ONNX export, with edgetok's KV caches; provider picks the execution provider).
    None chooses (runtimes/choice.py; `Model.choice` says what and why): ONNX Runtime on an ONNX
    export, or on the model's default export (built once under $EDGETOK_HOME/exports), with the
    tiered cache for prompts past the plan's exact limit unless kv is given; a backend that
    alone has a given option (weights, kv_type) otherwise. needs: capabilities the caller will use
    (runtimes/backends/base.py: PRUNE for prompt pruning), which a chosen engine must have.
    weights: the torch backend's weights — fp32 (exact reference), bf16, or int8 (weight-only).
    kv: the tiered KV cache's budget and tiers (torch backend); None keeps every token exact in RAM.
    kv_store: a folder where prompts' K/V persist, so a later process skips their prefill;
    kv_store_rebuild recomputes entries that are damaged or from another format instead of failing.
    max_memory_bytes: refuse (before loading the weights) when the predicted peak memory at the
    model's whole context — weights, KV cache, prefill workspace, runtime (devices/planner.py) —
    exceeds it.
    plan: "auto" (plan for this machine: `edgetok run`'s default), a plan saved by `edgetok plan
    --json`, or a devices.planner.Plan — when edgetok chooses the engine, the plan sets its
    execution provider, threads and the long prompts' KV cache, except what provider, threads and
    kv set (None: no plan; the default export, exact up to the planner's EXACT_UP_TO tokens).
    provider: ONNX Runtime's execution provider (default: the plan's, else cpu).
    """
    if not isinstance(ref, (str, os.PathLike)):
        raise EdgetokError(f"a model is named by a string or a path, not {type(ref).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise EdgetokError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise EdgetokError(f"threads must be a whole number from 1 to {MAX_THREADS}, not {threads!r}")
    if kv is not None and not isinstance(kv, KVConfig):
        raise EdgetokError(f"kv must be an edgetok.KVConfig, not {type(kv).__name__}")
    source = load_source(os.fspath(ref), progress=progress)
    reasons, artifact, long_prompts, planned = [], None, None, None
    chosen = backend is None
    if chosen:
        if kv is not None and kv.asks_cache_attention:
            needs = frozenset(needs) | {CACHE_ATTENTION}
        backend, why = auto_backend(source.format, weights, kv_type, frozenset(needs))
        reasons.append(why)
    if plan is not None and source.format == OPTIMUM:
        reasons.append("the plan is not applied: an optimum export runs with the exact KV cache only")
    elif plan is not None and backend == "onnxruntime" and chosen:
        planned = follow_plan(plan, source.config, provider, threads, kv is not None)
        provider, threads = planned.provider, planned.threads
        reasons.append(planned.reason)
    elif plan is not None:
        reasons.append(f"the plan is not applied: the options chose the {backend} engine, so the options alone set it")
    provider = provider or "cpu"
    if chosen:
        if backend == "onnxruntime" and source.format not in ONNX_FORMATS:
            from edgetok.exporters.default import default_export

            source = default_export(source, threads, progress)
            artifact = str(source.path)
    if max_memory_bytes is not None:
        _check_memory(source, backend, weights, kv, kv_type, max_memory_bytes)
    if backend != "onnxruntime" and provider != "cpu":
        raise EdgetokError(f"--provider chooses ONNX Runtime's execution provider (--backend onnxruntime); "
                           f"the {backend} backend runs on the CPU")
    if (backend == "onnxruntime") != (source.format in ONNX_FORMATS):
        if source.format in ONNX_FORMATS:
            raise EdgetokError(f"{source.path} is an ONNX export: it runs on --backend onnxruntime")
        raise EdgetokError("--backend onnxruntime runs an ONNX folder made by `edgetok export --format onnx` "
                           "(or by `optimum-cli export onnx --task text-generation-with-past`)")
    if backend != "torch" and "torch" in sys.modules:  # (the default engine never imports it)
        # torch only keeps the books here; its idle OpenMP workers would spin against the runtime's
        # own threads for the same cores
        sys.modules["torch"].set_num_threads(1)
    if backend == "onnxruntime":
        from edgetok.runtimes.backends.onnxruntime import OnnxBackend

        if kv_type is not None or weights != "fp32":
            raise EdgetokError("an ONNX export carries its own weights; --weights and --kv-type do not apply to it")
        if source.format == OPTIMUM:
            from edgetok.runtimes.backends.optimum import OptimumBackend

            engine_backend = OptimumBackend(source, provider=provider, threads=threads, kv=kv)
        else:
            engine_backend = OnnxBackend(source, provider=provider, threads=threads, kv=kv)
    elif backend == "llamacpp":
        from edgetok.runtimes.backends.llamacpp import LlamaCppBackend

        if kv is not None or kv_store is not None or weights != "fp32":
            raise EdgetokError("--weights, the tiered KV cache and --kv-store apply to the torch backend, not llama.cpp")
        engine_backend = LlamaCppBackend(source, threads=threads, kv_type=kv_type or "f16")
    else:
        if kv_type is not None:
            raise EdgetokError("--kv-type sets llama.cpp's cache; use it with --backend llamacpp")
        if weights not in TORCH_WEIGHTS:
            raise EdgetokError(f"unknown weights '{weights}' (choose from {', '.join(TORCH_WEIGHTS)})")
        engine_backend = _torch_backend(source, weights, kv, threads)
    if planned is not None:
        long_prompts = planned.long_prompts
    elif chosen and kv is None and backend != "llamacpp" and source.format != OPTIMUM:
        from edgetok.devices.planner import EXACT_UP_TO, TIERED_BUDGET

        if source.config.max_context > EXACT_UP_TO and not _torch_installed():
            reasons.append(f"the tiered cache (for prompts past {EXACT_UP_TO} tokens) computes in torch, which is not "
                           "installed (pip install 'edgetok[export]'): every prompt stays exact")
        elif source.config.max_context > EXACT_UP_TO:
            long_prompts = LongPrompts(EXACT_UP_TO, KVConfig(budget=f"{TIERED_BUDGET:.0%}"))
            reasons.append(f"past {EXACT_UP_TO} prompt tokens the plan's tiered cache decodes faster at a "
                           f"{TIERED_BUDGET:.0%} budget; shorter prompts stay exact")
    choice = EngineChoice(
        backend=backend, weights=_weights_words(source, backend, weights),
        kv=long_prompts.describe() if long_prompts else ("tiered at a " + kv.budget + " budget" if kv else "exact"),
        threads=threads or os.cpu_count() or 1, reasons=reasons, artifact=artifact,
        plan=planned.plan.to_dict() if planned is not None else None)
    store_factory = None
    if kv_store is not None:
        from edgetok.runtimes.kv.store import PromptStore

        def store_factory(cache):
            return PromptStore(Path(kv_store), source.fingerprint, cache.kv_dtype, rebuild=kv_store_rebuild)

    return Model(source, Engine(engine_backend, source.tokenizer, store_factory, long_prompts), choice)


def _torch_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None  # (finds it without importing it)


def _torch_backend(source: Source, weights: str, kv: KVConfig | None, threads: int | None):
    """The reference backend: the one engine that needs torch installed."""
    try:
        import torch
    except ImportError:
        raise EdgetokError("the torch backend needs torch, which is not installed: pip install 'edgetok[export]' (or run "
                           "without --backend torch and --weights: the default engine needs only ONNX Runtime)") from None
    from edgetok.runtimes.backends.pytorch import TorchBackend

    if threads is not None:
        torch.set_num_threads(threads)
    return TorchBackend(source, weights=weights, kv=kv)


def _weights_words(source: Source, backend: str, weights: str) -> str:
    if source.format == OPTIMUM:
        return "the weights optimum exported (ONNX)"
    if backend == "onnxruntime":
        m = source.manifest
        if m.weights == "source":  # (exporters/onnx.py: source_quantizer's plan)
            plan = ", ".join(f"{t} ×{n}" for t, n in (m.quantization or {}).get("plan", {}).items())
            return (f"the GGUF's own codes ({plan})" + (f", {m.activations} activations in the 4-bit ones" if m.activations
                                                         else "") + " (ONNX export)")
        return f"{m.weights} weights" + (f", {m.activations} activations" if m.activations else "") + " (ONNX export)"
    if backend == "llamacpp":
        return f"the GGUF's own types ({source.path.name})"
    return f"{weights} weights (torch)"


def _check_memory(source: Source, backend: str, weights: str, kv: KVConfig | None, kv_type: str | None, limit) -> None:
    """One sentence when the predicted peak exceeds `limit` bytes."""
    from edgetok.devices.planner import load_estimate
    from edgetok.runtimes.backends.llamacpp import KV_BYTES_PER_VALUE

    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise EdgetokError(f"max_memory_bytes must be a whole number of bytes > 0, not {limit!r}")
    cfg = source.config
    if source.format in (*ONNX_FORMATS, "gguf"):  # the files are what the runtime holds (mapped or read)
        files = [source.path] if source.path.is_file() else [p for p in source.path.rglob("*") if p.is_file()]
        held = sum(p.stat().st_size for p in files)
    else:
        held = cfg.n_params * {"fp32": 4, "bf16": 2, "int8": 1}.get(weights, 4)
    per_value = KV_BYTES_PER_VALUE[kv_type or "f16"] if backend == "llamacpp" else (2 if weights == "bf16" else 4)
    tiers = None
    if kv is not None and kv.device_mb is not None:  # the tiers bound the RAM the cache takes
        tiers = round((kv.device_mb + (kv.host_mb or 0)) * (1 << 20))
    estimate = load_estimate(cfg, held, per_value, kv_bytes=tiers)
    if estimate.peak > limit:
        raise EdgetokError(f"{source.ref} needs {estimate.words()}, more than max_memory_bytes "
                           f"({limit / (1 << 20):.0f} MB); try an int4 ONNX export, a KV budget with tiers, or a smaller model")
