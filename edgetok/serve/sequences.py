"""The server's sequences: a fixed set of engines (each keeps its last sequence's K/V), the
requests running on them, and the bounded queue of those waiting for one.

A request runs in a thread of its own: it waits for a free engine — the one whose cache holds the
longest prefix of its prompt (the previous turn of the same conversation), else the one idle the
longest — and drives it; the scheduler (scheduler.py) batches the engines' decode steps. What the
engine yields goes to the request's `emit` as it comes: text pieces, then the Result (or an
exception). The kept caches are what bounds prompt reuse: `max_sequences` of them.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from edgetok.errors import EdgetokError
from edgetok.runtimes.backends.base import SEQUENCES
from edgetok.runtimes.engine import Engine, GenerationConfig, Result
from edgetok.serve.scheduler import Cancelled, ScheduledBackend, Scheduler


class QueueFull(EdgetokError):
    """Every engine is busy and the queue holds max_queue requests already."""


@dataclass
class _Slot:
    engine: Engine
    backend: ScheduledBackend
    last_used: int = 0
    busy: bool = False
    kv: dict = field(default_factory=dict)  # the last generation's cache stats (resident bytes per tier)


@dataclass
class Request:
    """A running or waiting generation; `cancel()` stops it at its next token."""

    prompt: list[int]
    config: GenerationConfig
    emit: Callable[[object], None]  # text pieces, then a Result or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    reused_tokens: int = 0  # of the prompt, taken from a kept cache or the KV store

    def cancel(self) -> None:
        self.cancelled.set()


class Sequences:
    def __init__(self, scheduler: Scheduler, tokenizer, store_factory=None, max_sequences: int = 4,
                 max_queue: int = 16, long_prompts=None) -> None:
        if SEQUENCES not in scheduler.backend.capabilities:
            max_sequences = 1  # one context (llama.cpp): requests take turns
        self.scheduler = scheduler
        self.max_queue = max_queue
        self._slots = []
        for _ in range(max_sequences):
            backend = ScheduledBackend(scheduler)
            self._slots.append(_Slot(Engine(backend, tokenizer, store_factory, long_prompts), backend))
        self._cond = threading.Condition()
        self._waiting = 0
        self._clock = itertools.count(1)
        self.prompt_tokens = 0  # counters for /metrics
        self.completion_tokens = 0
        self.reused_tokens = 0
        self.drafted_tokens = 0  # --speculate: tokens drafted and verified, and of those accepted
        self.accepted_tokens = 0

    @property
    def max_sequences(self) -> int:
        return len(self._slots)

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return sum(s.busy for s in self._slots)

    def kv_bytes(self) -> dict[str, int]:
        """Bytes per tier that the engines' caches held at the end of their last generations."""
        total: dict[str, int] = {}
        for slot in self._slots:
            for tier, n in slot.kv.get("resident_bytes", {}).items():
                total[tier] = total.get(tier, 0) + int(n)
        return total

    def submit(self, request: Request) -> None:
        """Start the request (in its own thread), or raise QueueFull."""
        with self._cond:
            if all(s.busy for s in self._slots) and self._waiting >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_sequences} sequences run and "
                                f"{self._waiting} requests wait (--max-queue {self.max_queue})")
            self._waiting += 1
        threading.Thread(target=self._run, args=(request,), name="edgetok-request", daemon=True).start()

    def _acquire(self, request: Request) -> _Slot | None:
        with self._cond:
            try:
                while all(s.busy for s in self._slots) and not request.cancelled.is_set():
                    self._cond.wait(0.1)  # (a timeout: a cancel while waiting needs no notify)
                if request.cancelled.is_set():
                    return None
                free = [s for s in self._slots if not s.busy]
                slot = max(free, key=lambda s: (s.engine.reusable(request.prompt), -s.last_used))
                slot.busy = True
                return slot
            finally:
                self._waiting -= 1

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            slot.busy, slot.last_used = False, next(self._clock)
            self._cond.notify_all()

    def _run(self, request: Request) -> None:
        slot = self._acquire(request)
        if slot is None:
            request.emit(Cancelled())
            return
        engine = slot.engine
        slot.backend.cancelled = request.cancelled.is_set
        try:
            for piece in engine.generate_ids(request.prompt, request.config, cancel=request.cancelled.is_set):
                if isinstance(piece, Result):
                    slot.kv = piece.stats.kv
                    self.prompt_tokens += piece.prompt_tokens
                    self.reused_tokens += piece.stats.reused_prompt_tokens
                    self.completion_tokens += len(piece.tokens)
                    self.drafted_tokens += piece.stats.drafted
                    self.accepted_tokens += piece.stats.accepted
                request.emit(piece)
        except BaseException as e:  # Cancelled, an EdgetokError, a bug: the request hears of it
            if not isinstance(e, (Cancelled, EdgetokError)):
                engine.reset()  # stopped inside a step: the cache may hold half of it
            request.emit(e)
        finally:
            if engine.cache is not None:
                self.scheduler.idle(engine.cache)
            slot.backend.cancelled = lambda: False
            self._release(slot)
