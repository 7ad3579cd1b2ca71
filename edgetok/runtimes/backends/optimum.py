"""optimum's ONNX exports (optimum-cli export onnx --task text-generation-with-past) on ONNX
Runtime, their K/V in edgetok's exact cache.

optimum's decoder graph takes every layer's past K/V (past_key_values.N.key / value, (B, Hkv, P,
D)), an attention_mask over the past and the new tokens, and the new tokens' position_ids; it
returns every new token's logits and each layer's present (present.N.key / value): the past with
the new tokens' K/V after it, (B, Hkv, P + T, D).

Each forward binds the exact cache's whole buffers as the past (no copy of them per step) and masks
their spare slots with attention_mask zeros; the positions come from position_ids, not from where
a token sits, so the gap changes nothing. The new tokens' K/V are the presents' last T slots, which
the cache appends. The graph writes the presents (its own Concat) into arrays bound once per shape.

It runs what such a graph can: the exact cache, rollback, several sequences, the KV store. The
tiered cache, prompt pruning and batched decoding need edgetok's own export, and are refused.
"""

from __future__ import annotations

import numpy as np

from edgetok.errors import EdgetokError
from edgetok.fidelity import weights_effect
from edgetok.models import names
from edgetok.models.manifest import ONNX_MODEL
from edgetok.models.sources import OPTIMUM, Source
from edgetok.runtimes.backends.base import PREFIX_STATE, ROLLBACK, SEQUENCES
from edgetok.runtimes.backends.onnxruntime import DECODE_SLACK, open_session
from edgetok.runtimes.kv import ContiguousCache, KVConfig, KVState

EXPORT_COMMAND = "optimum-cli export onnx --task text-generation-with-past"
EXACT_ONLY = ("an optimum export runs with the exact KV cache only: the tiered cache (--kv-budget and the other --kv-* "
              "options) runs on edgetok's own ONNX export (edgetok export --format onnx) or the torch backend")


class OptimumBackend:
    name = "onnxruntime"
    capabilities = frozenset({PREFIX_STATE, ROLLBACK, SEQUENCES})
    prune_after_layer = None
    min_draft = 1  # (its cost curve is not measured)
    node_cost = 1.0  # (no TREE)

    def __init__(self, source: Source, provider: str = "cpu", threads: int | None = None, kv: KVConfig | None = None) -> None:
        assert source.format == OPTIMUM, source.format
        if kv is not None:
            raise EdgetokError(EXACT_ONLY)
        self.config = source.config
        if any(w is not None for w in self.config.windows):
            # the graph's sliding-window mask counts slots, and the spare slots this backend masks would shift it
            raise EdgetokError(f"{source.path} is an optimum export of a model with sliding-window layers, which edgetok "
                               "does not run; export the model with `edgetok export --format onnx` instead")
        self.weights_fidelity = weights_effect(source, "as stored")
        self.session = open_session(source.path / ONNX_MODEL, provider, threads)
        self.provider = self.session.get_providers()[0]
        self._check_graph(source)
        layers = self.config.num_layers
        self._pasts = [names.genai_past(kind, i) for i in range(layers) for kind in names.KV_KINDS]
        self._presents = [names.genai_present(kind, i) for i in range(layers) for kind in names.KV_KINDS]
        # the last binding: (its key, the binding, the arrays it reads and writes, the past buffers it points into)
        self._bound: tuple | None = None

    def _check_graph(self, source: Source) -> None:
        """One sentence for a graph this adapter cannot drive: not optimum's names, or not float32 K/V."""
        io = names.optimum_io_names(self.config.num_layers)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in io["inputs"] if n not in inputs] + [n for n in io["outputs"] if n not in outputs]
        if missing:
            raise EdgetokError(f"{source.path / ONNX_MODEL} lacks {', '.join(missing[:3])}"
                               f"{' and more' if len(missing) > 3 else ''} of a decoder with past K/V as optimum exports "
                               f"it for this config.json ({self.config.num_layers} layers); export it with `{EXPORT_COMMAND}`")
        kv_type = inputs[names.genai_past("key", 0)].type
        if kv_type != "tensor(float)":
            raise EdgetokError(f"{source.path / ONNX_MODEL} keeps its K/V as {kv_type}; edgetok runs optimum exports "
                               "with float32 K/V (the default of optimum-cli export onnx)")

    def new_cache(self, kv: KVConfig | None = None) -> ContiguousCache:
        if kv is not None:
            raise EdgetokError(EXACT_ONLY)
        c = self.config
        return ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, growth=0.0, slack=DECODE_SLACK)

    def forward(self, tokens: list[int], cache: ContiguousCache, last: int = 1) -> np.ndarray:
        """Logits (last, V) of the last `last` tokens."""
        n, length = len(tokens), cache.length
        views = [cache.view(i) for i in range(self.config.num_layers)]
        width = views[0][0].shape[2]
        # one attention_mask serves every layer: each holds every token and grows alike
        assert all(k.shape[2] == width and held == length for k, _, held in views), "every layer holds the same slots"
        binding, (ids, positions, mask, logits, presents) = self._binding(n, views)
        ids[0] = tokens
        positions[0] = np.arange(length, length + n)
        mask[0, :length] = 1
        mask[0, length:width] = 0  # the buffers' spare slots
        self.session.run_with_iobinding(binding)
        for i in range(self.config.num_layers):
            k, v = presents[2 * i], presents[2 * i + 1]
            cache.append(i, None, k[:, :, width:], v[:, :, width:])
        return logits[0, n - last :].copy()  # a copy out: the bound array is the next run's too

    def _binding(self, n: int, views: list) -> tuple:
        """The IO binding for n new tokens over these buffers, kept while they stay the same (a
        decode step rebinds only when the cache grows, every DECODE_SLACK tokens)."""
        key = (n, tuple((k.ctypes.data, v.ctypes.data, k.shape) for k, v, _ in views))
        if self._bound is not None and self._bound[0] == key:
            return self._bound[1:3]
        c = self.config
        width = views[0][0].shape[2]
        binding = self.session.io_binding()
        ids, positions = np.zeros((1, n), np.int64), np.zeros((1, n), np.int64)
        mask = np.ones((1, width + n), np.int64)
        logits = np.empty((1, n, c.vocab_size), np.float32)
        presents = [np.empty((1, c.num_kv_heads, width + n, c.head_dim), np.float32) for _ in self._presents]
        for name, array in ((names.INPUT_IDS, ids), (names.POSITION_IDS, positions), (names.GENAI_ATTENTION_MASK, mask)):
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        pasts = [t for k, v, _ in views for t in (k, v)]
        for name, t in zip(self._pasts, pasts):
            binding.bind_input(name, "cpu", 0, np.float32, list(t.shape), t.ctypes.data)
        for name, array in ((names.LOGITS, logits), *zip(self._presents, presents)):
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        arrays = (ids, positions, mask, logits, presents)
        self._bound = (key, binding, arrays, pasts)
        return binding, arrays

    def forward_batch(self, tokens: list[int], caches: list) -> np.ndarray:
        raise EdgetokError("batched decoding needs edgetok's own ONNX export (edgetok export --format onnx); "
                           "an optimum export decodes one sequence per forward")

    def forward_tree(self, tree, cache) -> np.ndarray:
        raise EdgetokError("draft trees (--draft-width above 1) need the torch backend or the default engine; "
                           "an optimum export verifies chains")

    def keep_branch(self, cache, tree, branch: list[int]) -> None:
        self.forward_tree(tree, cache)

    def prefill_pruned(self, tokens, cache, plan, chunk, progress=None):
        raise EdgetokError("--prune-prompt needs the torch backend or an ONNX export made by edgetok with "
                           "--prune-after-layer L; an optimum export has no pruning point")

    def truncate(self, cache: ContiguousCache, n: int) -> int:
        return cache.truncate(n)

    def end_prefill(self, cache: ContiguousCache) -> None:
        cache.end_prefill()

    def cache_stats(self, cache: ContiguousCache) -> dict:
        return cache.stats() | {"provider": self.provider}

    def save_prefix(self, cache: ContiguousCache) -> KVState:
        return cache.state

    def load_prefix(self, cache: ContiguousCache, state: KVState) -> None:
        cache.state = state
