"""The ONNX Runtime backend: an exported decoder graph (edgetok export --format onnx) whose K/V
lives in an edgetok cache.

Each forward binds every layer's past view as an input (the cache's own memory, no copy for the
exact cache; the chunks selected this step for the tiered one), runs the graph once, and hands
the new tokens' K/V and queries back to the cache. With GroupQueryAttention graphs the exact
cache's buffers are also bound as the present outputs: the graph writes the new K/V into the
cache in place.

A budgeted cache with a graph whose attention is edgetok's own operator is attended through
instead: the graph gets no past, and each layer's attention op hands its rotated queries and new
K/V to the cache (kernels/attention_op.cpp, ort_ops.attending_through), which attends as it does
for the torch model — chunks read at their stored widths, fetched from the tiers for that layer
only — so no layer's past is staged as float for the whole graph, in prefill or decode.

numpy only (no torch) with the exact cache; a budgeted cache computes in torch and imports it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from edgetok.errors import EdgetokError
from edgetok.fidelity import weights_effect
from edgetok.kernels import ort_ops
from edgetok.models import names
from edgetok.models.manifest import ONNX_MODEL
from edgetok.models.sources import Source, require_torch
from edgetok.runtimes.backends.base import BATCH, CACHE_ATTENTION, PREFIX_STATE, PRUNE, ROLLBACK, SEQUENCES, TREE
from edgetok.runtimes.backends.onnx_batch import DecodeBatch
from edgetok.runtimes.backends.providers import PROVIDERS, choose_provider
from edgetok.runtimes.kv import ContiguousCache, GraphCache, KVConfig, KVState
from edgetok.runtimes.prune import Pruned, PrunePlan
from edgetok.runtimes.speculation.tree import DraftTree

DECODE_SLACK = 128  # spare cache slots per growth: bounds both the copies and the masked work
BINDINGS_KEPT = 12  # one token and every draft length up to 11 tokens (each holds its logits: ≈ 0.2 MB per row); a rebind costs ~1 ms


def open_session(model_file: Path, provider: str = "cpu", threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    ort_ops.register(opts)  # edgetok's own operators (MatMulQ4), for the exports that use them
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
        ort_ops.check_loadable(e)
        raise EdgetokError(f"onnxruntime cannot load {model_file}: {str(e).splitlines()[0]}") from None


@dataclass
class _Bound:
    """A reusable IO binding and the arrays it reads and writes."""

    key: tuple
    binding: object
    ids: np.ndarray  # (1, S) int64
    positions: np.ndarray  # (1, S) int64
    past_length: np.ndarray  # (1, L) int64
    keep: np.ndarray | None = None  # (1,) float64
    forced: np.ndarray | None = None  # (1, S) bool
    past_positions: np.ndarray | None = None  # (1, C) int64: the positioned layers' slots (C: their buffers')
    logits: np.ndarray | None = None  # None: ONNX Runtime allocates it
    queries: list[np.ndarray] | None = None
    kept: np.ndarray | None = None
    outputs: list[str] = field(default_factory=list)  # every output, in bind order
    allocated: bool = False  # whether ONNX Runtime allocates some of them
    keep_alive: list = field(default_factory=list)  # every buffer the binding points into


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, source: Source, provider: str = "cpu", threads: int | None = None, kv: KVConfig | None = None) -> None:
        assert source.format == "onnx", source.format
        if source.manifest.genai:
            raise EdgetokError(f"{source.path} was exported with --genai for onnxruntime-genai "
                               "(onnxruntime_genai.Model(folder)); edgetok runs the same export made without --genai")
        self.config = source.config
        self.weights_fidelity = weights_effect(source, "as stored")
        # a forward of 2 tokens costs 1.20x one, of 4 1.62x, of 8 2.66x (SmolLM2's default export after
        # a 1K prompt, 2 threads; benchmarks/results/speculative_costs_session17.json): one drafted token pays
        self.min_draft = 1
        self.node_cost = 0.2  # (8 tokens 2.66x one: each drafted token about a fifth of a step)
        self.kv = kv
        self.session = open_session(source.path / ONNX_MODEL, provider, threads)
        self.threads = threads or os.cpu_count() or 1  # (ONNX Runtime's default: one per core; as api.load counts)
        self.provider = self.session.get_providers()[0]
        # gqa: present_key.i is the past buffer with the new tokens written in (in place when bound
        # to the past's memory); standard: the new tokens' K/V only
        manifest = source.manifest
        self.in_place = manifest.attention == "gqa"
        prune = manifest.prune
        self.prune = PrunePlan(1.0, **dataclasses.asdict(prune)) if prune else None
        # whether the graph takes the tokens kept whatever their scores (exports before it score by
        # attention alone)
        self.forces = names.PRUNE_FORCED in {i.name for i in self.session.get_inputs()}
        self.prune_after_layer = prune.after_layer if prune else None
        # the sliding layers after the pruning point: the graph masks their windows by the positions
        # of their slots, which all of them share (the kept tokens, then every later one)
        self.positioned = prune.positioned_layers(self.config.graph_windows) if prune else []
        # an export prunes only if it was built with a pruning point (--prune-after-layer)
        # a budgeted cache attends itself, layer by layer, where the graph's attention is edgetok's
        # operator (it hands each layer's attention over); a pruning graph's later layers run on
        # the kept tokens, which that hand-over does not place: it reads views
        self.attends_through = ort_ops.ATTENTION in (manifest.edgetok_ops or ()) and prune is None
        # batched decoding writes every row's K/V in place (gqa) into exact caches' copies
        batch = {BATCH} if self.in_place and kv is None else set()
        # edgetok's attention op (the one attended through) masks a draft tree's branches (ort_ops.draft_tree),
        # writing the nodes' K/V into the exact cache in place
        tree = {TREE} if self.in_place and self.attends_through else set()
        self.capabilities = frozenset({PREFIX_STATE, ROLLBACK, SEQUENCES} | ({PRUNE} if prune else set()) | batch | tree
                                      | ({CACHE_ATTENTION} if self.attends_through else set()))
        self._hook = ort_ops.ATTEND_HOOK(self._attend)  # (kept: the library holds only its address)
        self._through: tuple = (None, None)  # while a graph runs: the cache attended through, and its failure
        self._no_past = np.zeros((1, self.config.num_kv_heads, 0, self.config.head_dim), np.float32)
        self._batch = DecodeBatch(self.session, self.config, pruning=prune is not None, forces=self.forces,
                                  positioned=self.positioned) if batch else None
        self.manifest = manifest
        self._kept: np.ndarray | None = None  # which prompt tokens the last run's later layers kept
        # Bindings by shape and buffers, the most recently used last: speculative decoding
        # alternates single tokens with drafts of a few lengths, each of which would rebind.
        self._bindings: OrderedDict[tuple, _Bound] = OrderedDict()

    def new_cache(self, kv: KVConfig | None = None):
        c, kv = self.config, kv or self.kv
        if kv is not None:  # float32: what the graph reads, so a view needs no conversion
            require_torch("the tiered KV cache (--kv-budget and the other --kv-* options)")
            import torch  # (the budgeted caches compute in torch)

            from edgetok.runtimes.kv import budgeted_cache

            torch.set_num_threads(1)  # its idle workers would spin against ONNX Runtime's
            if self.attends_through:  # attention in the cache: its storage dtype (bf16 when approximate), stored forms
                return budgeted_cache(kv, c.windows, c.num_heads, c.num_kv_heads, c.head_dim, reads="through")
            return budgeted_cache(kv, c.windows, c.num_heads, c.num_kv_heads, c.head_dim, dtype=torch.float32, reads="views")
        # sliding layers keep only what their window sees: the graph's attention reads the slots it is
        # given (ONNX Runtime's GroupQueryAttention reads them all, local_window_size or not); a pruned
        # prompt's later sliding layers keep the kept positions instead, which the graph reads
        return ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, growth=0.0, slack=DECODE_SLACK,
                               windows=c.windows, compact_every=2 * DECODE_SLACK)

    def forward(self, tokens: list[int], cache: GraphCache, last: int = 1, prune_keep: float = 1.0,
                forced: np.ndarray | None = None, tree: DraftTree | None = None) -> np.ndarray:
        """Logits (last, V) of the last `last` tokens (of the kept ones, when prune_keep < 1 prunes;
        forced (S,) bool: tokens kept whatever their scores; tree: the tokens are its nodes)."""
        assert self.prune is not None or prune_keep == 1.0
        self._settle(cache)
        if self.attends_through and not isinstance(cache, ContiguousCache):
            return self._forward_through(tokens, cache, last)
        start, n, layers = cache.length, len(tokens), self.config.num_layers
        # float32 arrays; the exact cache's are its own (contiguous) buffers: no copy
        views = [(np.ascontiguousarray(k), np.ascontiguousarray(v), length)
                 for k, v, length in (cache.view(i, reserve=n) for i in range(layers))]
        # Room after the valid slots: the graph writes the new K/V there, into the cache itself.
        shared = [self.in_place and k.shape[2] >= length + n for k, _, length in views]
        reads = cache.queries_read > 0
        key = (n, last, prune_keep < 1.0, tuple((k.ctypes.data, v.ctypes.data, k.shape) for k, v, _ in views), tuple(shared),
               reads)
        bound = self._binding(key, views, shared, n, last, prune_keep < 1.0, reads)
        bound.ids[0] = tokens
        bound.positions[0] = np.arange(start, start + n) if tree is None else start + tree.depths
        bound.past_length[0] = [length for _, _, length in views]
        if bound.keep is not None:
            bound.keep[0] = prune_keep
        if bound.forced is not None:
            bound.forced[0] = False if forced is None else forced
        if self.positioned:
            first = self.positioned[0]
            p = views[first][2]
            assert all(views[i][2] == p for i in self.positioned), "the positioned layers hold the same tokens"
            bound.past_positions[0, :p] = cache.positions(first)
        if tree is None:
            self.session.run_with_iobinding(bound.binding)
        else:
            assert all(shared), "a draft tree's K/V is written in place"
            with ort_ops.draft_tree(tree.visible):
                self.session.run_with_iobinding(bound.binding)

        out = dict(zip(bound.outputs, bound.binding.get_outputs())) if bound.allocated else {}
        logits = bound.logits if bound.logits is not None else out[names.LOGITS].numpy()
        kept = None if self.prune is None else bound.kept if bound.kept is not None else out[names.KEPT].numpy()
        self._kept = None if kept is None else kept[0]
        n_kept = n if kept is None else kept.shape[1]
        ran = [n if self.prune is None or i <= self.prune.after_layer else n_kept for i in range(layers)]  # tokens per layer
        queries = self._queries(bound, out, ran, start, n, kept, cache.queries_read) if cache.queries_read else [None] * layers
        for i, ((k, v, length), m, q) in enumerate(zip(views, ran, queries)):
            if m < n:  # before the kept tokens are stored (a cache places them at these positions)
                cache.skip(i, n - m, start + kept[0])  # (numpy: the graph protocol)
            if shared[i]:  # the graph wrote the new K/V into the view's buffers, after its `length` slots
                cache.advance(i, q, m)
            else:
                k, v = (out[names.present(kind, i)].numpy() for kind in names.KV_KINDS)
                if self.in_place:  # gqa's present: the past and the new tokens
                    k, v = k[:, :, length : length + m], v[:, :, length : length + m]
                cache.append(i, q, k, v)
        return logits[0].copy()  # a copy out: the bound array is the next run's too

    def forward_tree(self, tree: DraftTree, cache: GraphCache) -> np.ndarray:
        if TREE not in self.capabilities:
            raise EdgetokError("draft trees (--draft-width above 1) need edgetok's attention operator, which this "
                               "export does not use (the default engine's export does); it verifies chains")
        if not cache.takes_trees:
            raise EdgetokError(cache.NO_TREES)
        return self.forward(list(tree.tokens), cache, last=len(tree.tokens), tree=tree)

    def keep_branch(self, cache: GraphCache, tree: DraftTree, branch: list[int]) -> None:
        self._settle(cache)
        cache.keep_branch(cache.length - len(tree.tokens), branch)

    def _forward_through(self, tokens: list[int], cache, last: int) -> np.ndarray:
        """Logits (last, V): the graph runs without a past, its attention op handing each layer's
        attention to the cache (_attend)."""
        c, n = self.config, len(tokens)
        views = [(self._no_past, self._no_past, 0)] * c.num_layers
        bound = self._binding((n, last, "through", ((self._no_past.ctypes.data,) * 2,)), views, [False] * c.num_layers,
                              n, last, pruning=False, reads=False)
        bound.ids[0] = tokens
        bound.positions[0] = np.arange(cache.length, cache.length + n)
        from edgetok.kernels import mixed_attention  # (torch's: a budgeted cache has imported it)

        # a decode step's tables, made now: the op then attends natively, no Python between layers
        tables = cache.step_tables(n)
        if tables is not None:  # the graph's intra-op threads, idle while a layer's hook runs, attend
            tables.run_on(self.threads, ort_ops.hook_parallel_for())
        hook, user = (self._hook, None) if tables is None else (mixed_attention.tables_hook(), tables.user)
        self._through = (cache, None)
        try:
            with ort_ops.attending_through(hook, user) as calls:
                try:
                    self.session.run_with_iobinding(bound.binding)
                except Exception:
                    failure = self._through[1]
                    if failure is not None:
                        raise failure from None
                    raise
                ran = calls()
        finally:
            self._through = (None, None)
        assert ran == c.num_layers, f"the graph's attention ran {ran} times for {c.num_layers} layers"
        if tables is not None:
            new = [[], []]  # (slabs hold theirs already: no outputs fetched)
            if tables.from_tables:
                out = dict(zip(bound.outputs, bound.binding.get_outputs()))
                new = [[out[names.present(kind, i)].numpy() for i in range(c.num_layers)] for kind in names.KV_KINDS]
            cache.end_step_tables(tables, *new)
        return bound.logits[0].copy()

    def _attend(self, _user, layer: int, q: int, k: int, v: int, s: int, scale: float, out: int) -> int:
        """The attention op's hand-over (ort_ops.ATTEND_HOOK): layer's rotated queries q (S, H, D),
        new keys and values k, v (Hkv, S, D) → out (S, H·D) from the cache. The op's buffers are
        reused by the next layer: the cache gets copies. → 0, or 1 with the failure kept."""
        import torch

        cache, _ = self._through
        try:
            c = self.config
            hq, hkv, d = c.num_heads, c.num_kv_heads, c.head_dim
            queries = torch.from_numpy(_floats(q, (s, hq, d))).transpose(0, 1).contiguous()[None]  # (1, Hq, S, D)
            if abs(scale * math.sqrt(d) - 1.0) > 1e-6:  # the cache's attention scales by 1/√D
                queries *= scale * math.sqrt(d)
            keys, values = (torch.from_numpy(_floats(x, (hkv, s, d)).copy())[None] for x in (k, v))
            attended = cache.attend(layer, queries, keys, values)  # (1, Hq, S, D)
            _floats(out, (s, hq * d))[:] = attended[0].transpose(0, 1).reshape(s, hq * d).float().numpy()
            return 0
        except BaseException as e:  # (nothing may cross back into ONNX Runtime's C++)
            self._through = (cache, e)
            return 1

    def forward_batch(self, tokens: list[int], caches: list[GraphCache]) -> np.ndarray:
        """(B, V): one graph run over the sequences' rows (onnx_batch.py); their K/V stays resident
        there until another call touches their cache."""
        if self._batch is None:
            raise EdgetokError("batched decoding needs an export with GroupQueryAttention (--attention gqa) "
                               "and the exact KV cache (no --kv-budget)")
        assert len({id(c) for c in caches}) == len(caches), "one token per sequence"
        exact = [b for b, c in enumerate(caches) if isinstance(c, ContiguousCache)]
        out = np.empty((len(caches), self.config.vocab_size), np.float32)
        if exact:
            out[exact] = self._batch.step([tokens[b] for b in exact], [caches[b] for b in exact])
        for b in sorted(set(range(len(caches))) - set(exact)):  # a long prompt's tiered cache: alone
            out[b] = self.forward([tokens[b]], caches[b])[-1]
        return out

    def _settle(self, cache) -> None:
        """A cache decoding in the batch gets its new tokens back before anything else reads it."""
        if self._batch is not None:
            self._batch.release(cache)

    @cached_property
    def _rope(self) -> tuple:
        """The graph's RoPE per layer (Gemma 3's sliding layers have their own base, and no
        scaling): (inverse frequencies per layer, the global ones, the cos / sin scale (longrope))."""
        import torch

        from edgetok.models.llama import local_inv_freq, rope_attention_factor

        config = self.manifest.config
        inv_freq = torch.tensor(self.manifest.rope_inv_freq, dtype=torch.float32)
        local = local_inv_freq(config)
        per_layer = [local if local is not None and config.window(i) is not None else inv_freq for i in range(config.num_layers)]
        return per_layer, inv_freq, rope_attention_factor(config)

    def _queries(self, bound: _Bound, out: dict, ran: list[int], start: int, n: int, kept: np.ndarray | None,
                 last: int) -> list:
        """Each layer's queries of its `last` last tokens (1, H, r, D), rotated to their positions:
        the graph's qkv.i hold them before RoPE (its attention rotates them itself). Layers that ran
        on the same tokens rotate together: the n new ones, or (after the prune layer) the kept ones.
        (A prefill piece has hundreds of tokens; the cache reads a few of their queries.) Rotated
        in torch: only a budgeted cache reads queries, and it computes in torch."""
        import torch

        from edgetok.models.llama import apply_rope, rope_cos_sin

        inv_freqs, global_inv_freq, rope_scale = self._rope
        c = self.config
        hd = c.num_heads * c.head_dim
        qkv = bound.queries if bound.queries is not None else [out[names.qkv(i)].numpy() for i in range(c.num_layers)]
        result: list[np.ndarray] = [None] * c.num_layers
        keys = [(r, id(f)) for r, f in zip(ran, inv_freqs)]  # layers alike: same tokens, same RoPE
        for key in dict.fromkeys(keys):
            group = [i for i, k in enumerate(keys) if k == key]
            m, inv_freq = key[0], inv_freqs[group[0]]
            r = min(m, last)
            positions = torch.arange(start, start + n) if m == n else start + torch.from_numpy(kept[0])
            scale = rope_scale if inv_freq is global_inv_freq else 1.0
            cos, sin = rope_cos_sin(inv_freq, positions[m - r :], scale)
            q = torch.stack([torch.from_numpy(qkv[i][0, m - r : m, :hd]) for i in group])  # (G, r, H·D): a copy
            q = apply_rope(q.view(len(group), r, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)  # (G, H, r, D)
            for j, i in enumerate(group):
                result[i] = q[j : j + 1].numpy()  # (the cache's protocol speaks numpy)
        return result

    def _binding(self, key, views, shared, n: int, last: int, pruning: bool, reads: bool) -> _Bound:
        """The binding for this shape over these buffers: decoding into the same buffers rebinds nothing."""
        bound = self._bindings.get(key)
        if bound is not None:
            self._bindings.move_to_end(key)
            return bound
        if any(old[3] != key[3] for old in self._bindings):
            self._bindings.clear()  # the cache's buffers moved: do not keep the old ones alive
        bound = self._bindings[key] = self._bind(key, views, shared, n, last, pruning, reads)
        if len(self._bindings) > BINDINGS_KEPT:
            self._bindings.popitem(last=False)
        return bound

    def _bind(self, key, views, shared, n: int, last: int, pruning: bool, reads: bool) -> _Bound:
        """An IO binding over persistent arrays: the next call with the same key only refills the
        inputs. Outputs whose shape is known before the run are bound to arrays of ours; the rest
        (a pruned run's, and new K/V that are not written in place) ONNX Runtime allocates."""
        c, layers = self.config, self.config.num_layers
        binding = self.session.io_binding()
        bound = _Bound(key, binding, np.zeros((1, n), np.int64), np.zeros((1, n), np.int64), np.zeros((1, layers), np.int64))

        def bind_in(name: str, array: np.ndarray) -> None:
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            bound.keep_alive.append(array)

        def bind_out(name: str, array: np.ndarray | None) -> np.ndarray | None:
            if array is None:
                binding.bind_output(name)
                bound.allocated = True
            else:
                binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            bound.outputs.append(name)
            bound.keep_alive.append(array)
            return array

        bind_in(names.INPUT_IDS, bound.ids)
        bind_in(names.POSITION_IDS, bound.positions)
        bind_in(names.PAST_LENGTH, bound.past_length)
        bind_in(names.LOGITS_TO_KEEP, np.array([last], np.int64))
        if self.prune is not None:
            bound.keep = np.ones(1, np.float64)
            bind_in(names.PRUNE_KEEP, bound.keep)
        if self.forces:
            bound.forced = np.zeros((1, n), bool)
            bind_in(names.PRUNE_FORCED, bound.forced)
        if self.positioned:  # as wide as the first one's buffer: the key fixes its shape
            bound.past_positions = np.zeros((1, views[self.positioned[0]][0].shape[2]), np.int64)
            bind_in(names.PAST_POSITIONS, bound.past_positions)
        for i, (k, v, _) in enumerate(views):
            for kind, t in zip(names.KV_KINDS, (k, v)):
                bound.keep_alive.append(t)
                binding.bind_input(names.past(kind, i), "cpu", 0, np.float32, list(t.shape), t.ctypes.data)
                bind_out(names.present(kind, i), t if shared[i] else None)
        known = None if pruning else n  # a pruned run's later layers keep a count the graph decides
        bound.logits = bind_out(names.LOGITS, None if known is None else np.empty((1, last, c.vocab_size), np.float32))
        width = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        if known is not None and not reads:
            # Nobody reads the queries (an exact cache): every layer's qkv output goes to one scratch
            # array — layer i's attention has read it before layer i + 1 (which needs its output)
            # writes there. One per layer would hold 30 × n × width floats: 59 MB per 512-token piece
            # on SmolLM2, kept with the binding (a third of a 1K prompt's peak RSS).
            scratch = np.empty((1, n, width), np.float32)
            for i in range(layers):
                bind_out(names.qkv(i), scratch)
        else:
            queries = [bind_out(names.qkv(i), None if known is None else np.empty((1, n, width), np.float32)) for i in range(layers)]
            bound.queries = None if known is None else queries
        if self.prune is not None:
            bound.kept = bind_out(names.KEPT, None if known is None else np.empty((1, n), np.int64))
        return bound

    def prefill_pruned(self, prompt: list[int], cache, plan: PrunePlan, chunk: int, progress=None) -> Pruned:
        """The whole prompt in one run of the graph, which prunes after its layer (its own scoring,
        TopK and Gather: runtimes/prune.py's, op for op). Layers up to the prune layer attend over
        the whole prompt at once (memory ∝ prompt², unlike the chunked unpruned prefill)."""
        if self.prune is None:
            raise EdgetokError("this ONNX export has no pruning point; "
                               "export it again with --prune-after-layer L to run --prune-prompt on it")
        if dataclasses.replace(plan, keep=1.0, referenced_share=self.prune.referenced_share) != self.prune:
            raise EdgetokError(
                f"this ONNX export prunes after layer {self.prune.after_layer}; pass --prune-after-layer "
                f"{self.prune.after_layer} or export again with --prune-after-layer {plan.after_layer}"
            )
        assert cache.length == 0, "a pruned prefill starts from an empty cache"
        # what the window's words refer to, kept as the torch path keeps it (an export before
        # PRUNE_FORCED scores by attention alone)
        logits = self.forward(prompt, cache, prune_keep=plan.keep, forced=plan.forced(prompt) if self.forces else None)
        if progress:
            progress(len(prompt))
        return Pruned(logits[-1], self._kept.copy())

    def truncate(self, cache: GraphCache, n: int) -> int:
        self._settle(cache)
        return cache.truncate(n)

    def end_prefill(self, cache: GraphCache) -> None:
        self._settle(cache)
        cache.end_prefill()

    def cache_stats(self, cache: GraphCache) -> dict:
        self._settle(cache)
        return cache.stats() | {"provider": self.provider}

    def save_prefix(self, cache: GraphCache) -> KVState:
        self._settle(cache)
        return cache.state

    def load_prefix(self, cache: GraphCache, state: KVState) -> None:
        self._settle(cache)
        cache.state = state


def _floats(address: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array of `shape` at a C address (memory someone else keeps alive)."""
    return np.ctypeslib.as_array((ctypes.c_float * math.prod(shape)).from_address(address)).reshape(shape)


def onnx_logits(source: Source, tokens: list[int], threads: int | None = None, chunk: int = 256):
    """Logits (T, V) at every position, prefilled in chunks: what parity reports compare (a tensor)."""
    import torch

    backend = OnnxBackend(source, threads=threads)
    cache = backend.new_cache()
    pieces = [tokens[i : i + chunk] for i in range(0, len(tokens), chunk)]
    return torch.from_numpy(np.concatenate([backend.forward(piece, cache, last=len(piece)) for piece in pieces]))
