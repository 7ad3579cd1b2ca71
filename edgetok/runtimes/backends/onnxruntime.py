"""The ONNX Runtime backend: an exported decoder graph (edgetok export --format onnx) whose K/V
lives in an edgetok cache.

Each forward binds every layer's past view as an input (the cache's own memory, no copy for the
exact cache; the chunks selected this step for the tiered one), runs the graph once, and hands
the new tokens' K/V and queries back to the cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.models.sources import Source
from edgetok.runtimes.kv import ContiguousCache, KVConfig, TieredCache

# --provider → (ONNX Runtime's name, the package that brings it)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime (macOS build)"),
    "qnn": ("QNNExecutionProvider", "onnxruntime-qnn"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino"),
}
AUTO_ORDER = ("cuda", "dml", "coreml", "qnn", "openvino")
DECODE_SLACK = 128  # spare cache slots per growth: bounds both the copies and the masked work


def choose_provider(provider: str) -> str:
    """--provider → an available ONNX Runtime execution provider, or one clear error."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "auto":
        for p in AUTO_ORDER:
            if PROVIDERS[p][0] in available:
                return PROVIDERS[p][0]
        print("edgetok: warning: no accelerator execution provider is available; running on CPU", file=sys.stderr)
        return PROVIDERS["cpu"][0]
    if provider not in PROVIDERS:
        raise EdgetokError(f"unknown --provider '{provider}' (choose from auto, {', '.join(PROVIDERS)})")
    name, package = PROVIDERS[provider]
    if name not in available:
        raise EdgetokError(
            f"the {provider} execution provider is not available in this onnxruntime "
            f"(it has {', '.join(available)}); install {package} in place of onnxruntime"
        )
    return name


def open_session(model_file: Path, provider: str = "cpu", threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    name = choose_provider(provider)
    if name == PROVIDERS["cpu"][0]:
        # QDQ graphs are for NPUs; on CPU, dequantize their weights once at load: exact float math
        # (ONNX Runtime would otherwise make int8-activation MatMulNBits of them: −2 points of top-1
        # on SmolLM2 int8, or a float-activation path many times slower).
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(str(model_file), opts, providers=[name])
    except EdgetokError:
        raise
    except Exception as e:  # onnxruntime raises its own types for unreadable or invalid graphs
        raise EdgetokError(f"onnxruntime cannot load {model_file}: {str(e).splitlines()[0]}") from None


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, source: Source, provider: str = "cpu", threads: int | None = None, kv: KVConfig | None = None) -> None:
        assert source.format == "onnx", source.format
        self.config = source.config
        self.kv = kv
        self.session = open_session(source.path / "model.onnx", provider, threads)
        self.provider = self.session.get_providers()[0]
        self.output_names = [o.name for o in self.session.get_outputs()]
        layers = self.config.num_layers
        self._present = [(self.output_names.index(f"present_key.{i}"), self.output_names.index(f"present_value.{i}")) for i in range(layers)]
        self._queries = [self.output_names.index(f"query.{i}") for i in range(layers)]

    def new_cache(self):
        c = self.config
        if self.kv is not None:  # float32: what the graph reads, so a view needs no conversion
            return TieredCache(self.kv, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, dtype=torch.float32)
        return ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, growth=0.0, slack=DECODE_SLACK)

    def forward(self, tokens: list[int], cache, last_only: bool = True) -> torch.Tensor:
        """Logits (V,) of the last token, or (T, V) of all of them with last_only=False."""
        start, n = cache.length, len(tokens)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([tokens], dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(start, start + n, dtype=np.int64)[None])
        binding.bind_cpu_input("logits_to_keep", np.array([1 if last_only else 0], dtype=np.int64))
        valid = set()
        for i in range(self.config.num_layers):
            k, v, length = cache.view(i)
            # Views are float32; the exact cache's buffers are contiguous already (no copy).
            binding.bind_cpu_input(f"past_key.{i}", np.ascontiguousarray(k.numpy()))
            binding.bind_cpu_input(f"past_value.{i}", np.ascontiguousarray(v.numpy()))
            valid.add((length, k.shape[2]))
        # One past_length masks every layer's spare slots: the exact cache's layers all hold the
        # same tokens; a budgeted cache's views (each its own length) have no spare slots.
        assert len(valid) == 1 or all(length == slots for length, slots in valid), valid
        binding.bind_cpu_input("past_length", np.array([max(length for length, _ in valid)], dtype=np.int64))
        for name in self.output_names:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        out = binding.copy_outputs_to_cpu()
        for i, ((ki, vi), qi) in enumerate(zip(self._present, self._queries)):
            cache.append(i, torch.from_numpy(out[qi]), torch.from_numpy(out[ki]), torch.from_numpy(out[vi]))
        logits = torch.from_numpy(out[0][0])
        return logits[-1] if last_only else logits

    def truncate(self, cache, n: int) -> int:
        return cache.truncate(n)

    def end_prefill(self, cache) -> None:
        cache.end_prefill()

    def cache_stats(self, cache) -> dict:
        return cache.stats() | {"provider": self.provider}

    def ingest(self, cache, layers, q_obs) -> None:
        cache.ingest(layers, q_obs)

    def export(self, cache):
        return cache.export()


def onnx_logits(source: Source, tokens: list[int], threads: int | None = None, chunk: int = 256) -> torch.Tensor:
    """Logits (T, V) at every position, prefilled in chunks: what parity reports compare."""
    backend = OnnxBackend(source, threads=threads)
    cache = backend.new_cache()
    return torch.cat([backend.forward(tokens[i : i + chunk], cache, last_only=False) for i in range(0, len(tokens), chunk)])
