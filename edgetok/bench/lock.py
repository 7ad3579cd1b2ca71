"""The machine-wide benchmark lock: timings run while no other benchmark (or test run) does."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager

BENCH_LOCK = "/tmp/edgetok-bench.lock"  # what `flock /tmp/edgetok-bench.lock CMD` takes too


@contextmanager
def bench_lock() -> Iterator[None]:
    with open(BENCH_LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
