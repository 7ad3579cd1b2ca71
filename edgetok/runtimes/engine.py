"""Generation: chunked prefill, the decode loop, stop conditions, streaming text.

The engine keeps the KV cache of its last sequence: a new prompt that starts with the same
tokens (the next turn of a chat) prefills only what is new.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from edgetok.errors import EdgetokError
from edgetok.fidelity import run_fidelity
from edgetok.models.tokenizer import StreamDecoder, Tokenizer
from edgetok.runtimes.backends.base import PREFIX_STATE, PRUNE, ROLLBACK, Backend
from edgetok.runtimes.choice import LongPrompts
from edgetok.runtimes.kv import KVConfig
from edgetok.runtimes.prune import PrunePlan, check_keep
from edgetok.runtimes.sampling import SamplingParams, new_generator, sample
from edgetok.runtimes.speculation import Drafter, SpeculationParams, SpeculativeSteps, new_drafter


@dataclass
class GenerationConfig(SamplingParams, SpeculationParams):
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one
    ignore_eos: bool = False
    prefill_chunk: int = 512  # prompt tokens per forward: bounds activation memory on long prompts
    prune_prompt: float | None = None  # keep this fraction of the prompt after prune_after_layer (None: keep all)
    prune_after_layer: int | None = None  # the last layer that sees every prompt token (None: a default)

    def __post_init__(self) -> None:
        # (field, whole number?, in range?, the range in words): NaN fails every comparison, and
        # infinity is refused by name (temperature=inf would sample uniformly, not "very hot")
        checks = [
            ("max_new_tokens", True, lambda v: v >= 0, "≥ 0"),
            ("temperature", False, lambda v: v >= 0, "≥ 0"),
            ("top_k", True, lambda v: v >= 0, "≥ 0"),
            ("top_p", False, lambda v: 0 < v <= 1, "in (0, 1]"),
            ("min_p", False, lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("repetition_penalty", False, lambda v: v > 0, "> 0"),
            ("prefill_chunk", True, lambda v: v > 0, "> 0"),
        ]
        for name, whole, in_range, words in checks:
            value = getattr(self, name)
            number = isinstance(value, int) if whole else isinstance(value, (int, float)) and math.isfinite(value)
            if isinstance(value, bool) or not number or not in_range(value):
                kind = "a whole number" if whole else "a finite number"
                raise EdgetokError(f"{name} must be {kind} {words}, not {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise EdgetokError(f"seed must be a whole number in [0, 2**63), not {self.seed!r}")
        self.check_speculation()
        if self.prune_after_layer is not None and (isinstance(self.prune_after_layer, bool)
                                                   or not isinstance(self.prune_after_layer, int)):
            raise EdgetokError(f"--prune-after-layer must be a layer's number, not {self.prune_after_layer!r}")
        if self.prune_prompt is not None:
            check_keep(self.prune_prompt)
        elif self.prune_after_layer is not None:
            raise EdgetokError("--prune-after-layer needs --prune-prompt KEEP")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) for x in stops):
            raise EdgetokError(f"stop must be a string or a list of strings, not {self.stop!r}")
        self.stop = tuple(x for x in stops if x)


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # taken from the previous sequence's cache or the KV store, not prefilled
    store_tokens: int = 0  # of those, read from the persistent KV store
    generated_tokens: int = 0
    decode_steps: int = 0  # forward passes after prefill (one per token, but the first token comes from prefill)
    # --speculate: drafted tokens, those accepted, and the forwards that verified drafts (and their time)
    drafted: int = 0
    accepted: int = 0
    verify_rounds: int = 0
    verify_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    time_to_first_token_s: float = 0.0
    peak_rss_bytes: int = 0
    kv: dict = field(default_factory=dict)  # what the KV cache did (tiers, bytes read, budget used)
    prune: dict = field(default_factory=dict)  # with --prune-prompt: keep, after_layer, kept_tokens
    fidelity: dict = field(default_factory=dict)  # each lossy knob and its estimated effect (edgetok/fidelity.py)

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.reused_prompt_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens the decode forwards chose: one each, and the drafted tokens they accepted."""
        return (self.decode_steps + self.accepted) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Drafted tokens accepted per verifying forward."""
        return self.accepted / self.verify_rounds if self.verify_rounds else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "mean_accepted_length": round(self.mean_accepted_length, 3),
        }


@dataclass
class Result:
    text: str
    tokens: list[int]  # generated ids, without the final EOS
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" (a stop string) | "length" | "cancelled" (the caller's cancel)
    stats: Stats = field(default_factory=Stats)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, the peak of this program's own memory —
    ru_maxrss carries over exec from the process that started it (a bench that built an export
    in-process would lend its peak to every system it then runs)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class Stream:
    """Iterate for text pieces; `.result` holds the Result once the iteration has ended.

    Leaving the loop early (break, an exception), `close()` or the end of a `with` block ends the
    generation at the current token: the model is free for the next call, and `.result` stays None."""

    def __init__(self, pieces: Generator[str | Result, None, None]) -> None:
        self._pieces = pieces
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self._pieces:
                if isinstance(piece, Result):
                    self.result = piece
                else:
                    yield piece
        finally:
            self._pieces.close()  # a loop left early (break, an exception) ends the generation

    def close(self) -> None:
        self._pieces.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StopStringFilter:
    """Holds back text that may be the start of a stop string; cuts the text at one that appears."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is now safe to emit."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class PlainSteps:
    """Decode steps of one token each."""

    def __init__(self, backend: Backend, cache, cached_ids: list[int], params: SamplingParams,
                 seen: np.ndarray | None, generator: np.random.Generator, stats: Stats) -> None:
        self.backend, self.cache, self.cached_ids = backend, cache, cached_ids
        self.params, self.seen, self.generator, self.stats = params, seen, generator, stats

    def after(self, out_ids: list[int], room: int) -> list[int]:
        """Run the last generated token → the next one."""
        token = out_ids[-1]
        logits = self.backend.forward([token], self.cache)[-1]
        self.cached_ids.append(token)
        self.stats.decode_steps += 1
        return [sample(logits, self.params, self.seen, self.generator)]


class Engine:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, store_factory: Callable | None = None,
                 long_prompts: LongPrompts | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        if store_factory is not None and PREFIX_STATE not in backend.capabilities:
            raise EdgetokError(f"--kv-store needs a backend that can save a prompt's K/V; {backend.name} cannot")
        self.store_factory = store_factory  # cache → PromptStore, for --kv-store
        self.long_prompts = long_prompts  # prompts past a length get the tiered cache
        self._cache_kv: KVConfig | None = None  # the settings self._cache was made with (None: the backend's)
        self.config = backend.config
        self._cache = None
        self._cached_ids: list[int] = []  # tokens whose K/V the cache holds, in order
        self._pruned = False  # the cache holds a pruned prompt: no prefix of it is reusable
        # --speculate: drafters by settings; Token Recycling's table serves the next generations too
        self._drafters: dict[tuple, Drafter] = {}

    def reset(self) -> None:
        self._cache, self._cached_ids, self._pruned = None, [], False

    def reusable(self, prompt: list[int]) -> int:
        """How many of the prompt's first tokens this engine's cache holds (what a prefill of it
        would reuse, at most)."""
        n = 0
        for a, b in zip([] if self._pruned else self._cached_ids, prompt[:-1]):
            if a != b:
                break
            n += 1
        return n

    @property
    def cache(self):
        """The KV cache of the last sequence (None before the first)."""
        return self._cache

    def _cache_for(self, prompt: list[int]) -> None:
        """A cache of the kind this prompt needs: the tiered one past long_prompts.above tokens (a
        conversation that grows past it starts a new cache: the exact one's K/V is not reused)."""
        lp = self.long_prompts
        kv = lp.kv if lp is not None and len(prompt) > lp.above else None
        if self._cache is None or kv is not self._cache_kv:
            self._cache, self._cached_ids, self._pruned = self.backend.new_cache(kv), [], False
            self._cache_kv = kv

    def _prefill(
        self, prompt: list[int], chunk: int, progress: Callable[[int], None] | None, stats: Stats
    ) -> np.ndarray:
        """Run the prompt, reusing the longest prefix the cache (or the KV store) holds → the last
        token's logits (V,)."""
        self._cache_for(prompt)
        # keep ≥ 1 token to prefill (its logits are needed); a pruned prompt is no prefix of anything
        reused = self.reusable(prompt)
        self._pruned = False
        reused = self.backend.truncate(self._cache, reused)
        self._cached_ids = prompt[:reused]
        store = self.store_factory(self._cache) if self.store_factory else None
        entry = None
        if store is not None and reused == 0:
            entry = store.lookup(prompt)
            n = min(len(entry.tokens), len(prompt) - 1) if entry else 0
            loaded = store.load(entry, n) if n else None
            if loaded is None:
                entry = None  # unusable (and, with rebuild, removed): this prefill writes it anew
            else:
                self.backend.load_prefix(self._cache, loaded)
                reused = stats.store_tokens = n
                self._cached_ids = prompt[:n]
        stats.reused_prompt_tokens = reused
        if progress and reused:
            progress(reused)  # a progress bar counts the whole prompt, reused tokens at once
        logits = None
        for start in range(reused, len(prompt), chunk):
            piece = prompt[start : start + chunk]
            logits = self.backend.forward(piece, self._cache)[-1]
            self._cached_ids += piece
            if progress:
                progress(len(piece))
        assert logits is not None
        if store is not None and (entry is None or len(entry.tokens) < len(prompt)):
            store.save(prompt, self.backend.save_prefix(self._cache))
        self.backend.end_prefill(self._cache)
        return logits

    def _prefill_pruned(
        self, prompt: list[int], cfg: GenerationConfig, progress: Callable[[int], None] | None, stats: Stats
    ) -> np.ndarray:
        """The whole prompt, pruned after a layer → the last token's logits (V,). Nothing is reused
        or stored: a pruned prompt's K/V depends on all of it (the window at its end chose the kept
        tokens)."""
        if PRUNE not in self.backend.capabilities:
            raise EdgetokError(
                f"--prune-prompt needs the torch backend or an ONNX export made with --prune-after-layer L; "
                f"this {self.backend.name} model cannot prune"
            )
        after_layer = cfg.prune_after_layer if cfg.prune_after_layer is not None else self.backend.prune_after_layer
        plan = PrunePlan.checked(cfg.prune_prompt, after_layer, self.config)
        self._cache_for(prompt)
        self.backend.truncate(self._cache, 0)
        self._cached_ids, self._pruned = [], True
        pruned = self.backend.prefill_pruned(prompt, self._cache, plan, cfg.prefill_chunk, progress)
        self._cached_ids = list(prompt)
        stats.prune = {"keep": plan.keep, "after_layer": plan.after_layer, "kept_tokens": len(pruned.kept)}
        self.backend.end_prefill(self._cache)
        return pruned.logits

    def _steps(self, prompt: list[int], cfg: GenerationConfig, seen: np.ndarray | None, generator: np.random.Generator,
               stats: Stats, drafter: Drafter | None) -> PlainSteps | SpeculativeSteps:
        """What runs the decode steps: one token per forward, or drafts verified (--speculate)."""
        if cfg.speculate == "none" and drafter is None:
            return PlainSteps(self.backend, self._cache, self._cached_ids, cfg, seen, generator, stats)
        if ROLLBACK not in self.backend.capabilities:
            raise EdgetokError(f"--speculate needs a backend that can drop rejected draft tokens; {self.backend.name} cannot")
        if drafter is None:
            key = (cfg.speculate, cfg.lookup_ngram_min, cfg.lookup_ngram_max, cfg.draft_width)
            if key not in self._drafters:
                self._drafters[key] = new_drafter(cfg, self.config.vocab_size)
            drafter = self._drafters[key]
        drafter.start(prompt)
        return SpeculativeSteps(self.backend, self._cache, self._cached_ids, drafter, cfg.draft_max, cfg.draft_width, cfg, seen,
                                generator, stats)

    def generate_ids(
        self, prompt: list[int], cfg: GenerationConfig, progress: Callable[[int], None] | None = None,
        drafter: Drafter | None = None, cancel: Callable[[], bool] | None = None,
    ) -> Iterator[str | Result]:
        """Yield text pieces as tokens are generated, then the Result.

        drafter: speculate with this one rather than the one cfg.speculate names.
        cancel: asked before each decode step; True ends the generation there ("cancelled")."""
        ctx = self.config.max_context
        if not prompt:
            raise EdgetokError("the prompt is empty")
        if len(prompt) >= ctx:
            raise EdgetokError(f"the prompt is {len(prompt)} tokens, but the model's context holds {ctx} (with room for 1 new token)")
        stats = Stats(prompt_tokens=len(prompt))
        seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        generator = new_generator(seed)
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = np.zeros(self.config.vocab_size, dtype=bool)
            seen[prompt] = True

        t0 = time.perf_counter()
        if cfg.prune_prompt is None:
            logits = self._prefill(prompt, cfg.prefill_chunk, progress, stats)
        else:
            logits = self._prefill_pruned(prompt, cfg, progress, stats)
        stats.prefill_s = time.perf_counter() - t0

        decoder, stops = StreamDecoder(self.tokenizer), StopStringFilter(cfg.stop)
        steps = self._steps(prompt, cfg, seen, generator, stats, drafter)
        out_ids: list[int] = []
        emitted: list[str] = []
        decoded = 0  # characters the stream decoder has released
        finish = "length"
        budget = min(cfg.max_new_tokens, ctx - len(prompt))
        t1 = time.perf_counter()
        chosen: list[int] = []  # tokens chosen but not yet generated (a step may choose several)
        if budget:
            chosen = [sample(logits, cfg, seen, generator)]
            stats.time_to_first_token_s = time.perf_counter() - t0
        while chosen:
            token = chosen.pop(0)
            if token in self.tokenizer.eos_ids and not cfg.ignore_eos:
                finish = "eos"
                break
            out_ids.append(token)
            if seen is not None:
                seen[token] = True
            text = decoder.push(token)
            decoded += len(text)
            if piece := stops.feed(text):
                emitted.append(piece)
                yield piece
            if stops.stopped:
                finish = "stop"
                break
            if not chosen and len(out_ids) < budget:
                if cancel is not None and cancel():
                    finish = "cancelled"
                    break
                chosen = steps.after(out_ids, budget - len(out_ids))
        stats.decode_s = time.perf_counter() - t1
        stats.generated_tokens = len(out_ids)

        if not stops.stopped:
            # The decoder may hold back an incomplete character at the very end; the filter, a
            # possible start of a stop string.
            tail = stops.feed(self.tokenizer.decode(out_ids)[decoded:])
            if stops.stopped:
                finish = "stop"
            tail += stops.flush()
            if tail:
                emitted.append(tail)
                yield tail
        stats.peak_rss_bytes = peak_rss_bytes()
        stats.kv = self.backend.cache_stats(self._cache)
        stats.fidelity = run_fidelity(self.backend.weights_fidelity, stats.kv, stats.prune, len(prompt))
        yield Result("".join(emitted), out_ids, len(prompt), finish, stats)
