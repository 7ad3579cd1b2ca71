"""The disk tier read past the page cache (--kv-disk-uncached) and the prefetch's measurements."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_tiered_cache import PROMPT, decode, source  # noqa: F401  (the tiny 4-layer model fixture)

from edgetok.errors import EdgetokError
from edgetok.runtimes.backends.pytorch import TorchBackend
from edgetok.runtimes.kv import KVConfig
from edgetok.runtimes.kv.codec import Packed
from edgetok.runtimes.kv.disk import DiskFile
from edgetok.runtimes.kv.prefetch import Prefetcher
from edgetok.runtimes.kv.stats import Counters

DISK_STATS = ("disk_uncached", "disk_wait_s", "sync_read_s", "prefetch_wait_s", "prefetch_read_s", "sync_disk_reads",
              "prefetch_chunks", "prefetch_unused", "prefetch_unused_bytes", "prefetch_paused_reads", "process_read_bytes")


def tiers(tmp_path: Path, **kw) -> KVConfig:
    return KVConfig(budget="100%", device_mb=0.05, host_mb=0.1, disk_dir=tmp_path, **kw)  # most chunks on disk


def on_tmpfs(path: Path) -> bool:
    """Whether `path` lives in RAM (tmpfs/ramfs): there every read is a page-cache read."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return True
    best = max((m for m in mounts if str(path.resolve()).startswith(m[1])), key=lambda m: len(m[1]), default=None)
    return best is None or best[2] in ("tmpfs", "ramfs")


def process_read_bytes() -> int | None:
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
        return int(next(line for line in lines if line.startswith("read_bytes:")).split()[1])
    except (OSError, StopIteration):
        return None


@pytest.mark.parametrize("prefetch", ["on", "off"])
def test_uncached_reads_are_exact(source, tmp_path, prefetch):  # noqa: F811
    """The same tokens and bit-identical logits as the page-cache path, and as full attention."""
    want, want_logits, _ = decode(TorchBackend(source), PROMPT, 30)
    got = {}
    for uncached in (False, True):
        folder = tmp_path / str(uncached)
        tokens, logits, cache = decode(TorchBackend(source, kv=tiers(folder, prefetch=prefetch, disk_uncached=uncached)),
                                       PROMPT, 30)
        stats = cache.stats()
        assert stats["disk_uncached"] is uncached and stats["bytes_read_per_token"]["disk"] > 0
        got[uncached] = tokens, logits
        cache.close()
        assert list(folder.iterdir()) == []
    assert got[True][0] == got[False][0] == want
    assert torch.equal(got[True][1], got[False][1])
    assert (got[True][1] - want_logits).abs().max() < 1e-4


def test_disk_stats_with_prefetch(source, tmp_path):  # noqa: F811
    _, _, cache = decode(TorchBackend(source, kv=tiers(tmp_path, disk_uncached=True, prefetch="on")), PROMPT, 20)
    s = cache.stats()
    assert set(DISK_STATS) <= set(s)
    assert s["decode_steps"] == 20
    # A full budget selects every chunk at every step: after the first step the prefetch predicts
    # every disk chunk, reads nothing in vain, and the model thread reads from disk only at step 1.
    assert s["prefetch_chunks"] > 0 and s["prefetch_unused"] == 0 and s["prefetch_unused_bytes"] == 0
    assert s["prefetch_hits"] == s["prefetch_chunks"] - s["prefetch_unused"]
    assert 0 < s["sync_disk_reads"] < s["prefetch_hits"]
    assert s["prefetch_read_s"] > 0 and s["disk_wait_s"] >= s["sync_read_s"] > 0
    assert s["disk_wait_s"] == pytest.approx(s["sync_read_s"] + s["prefetch_wait_s"], abs=2e-4)
    assert s["process_read_bytes"] is None or s["process_read_bytes"] >= 0
    cache.close()


def test_disk_stats_without_prefetch(source, tmp_path):  # noqa: F811
    _, _, cache = decode(TorchBackend(source, kv=tiers(tmp_path, prefetch="off")), PROMPT, 10)
    s = cache.stats()
    assert s["disk_uncached"] is False
    assert s["prefetch_hits"] == s["prefetch_chunks"] == s["prefetch_read_s"] == s["prefetch_wait_s"] == 0
    assert s["sync_disk_reads"] > 0 and s["disk_wait_s"] == s["sync_read_s"] > 0
    cache.close()


def test_resident_cache_has_no_disk_stats(source):  # noqa: F811
    _, _, cache = decode(TorchBackend(source, kv=KVConfig(budget="50%")), PROMPT, 3)
    assert not set(DISK_STATS) & set(cache.stats())


def test_prefetch_steps_widen_the_prediction(source, tmp_path):  # noqa: F811
    """A 30 % budget: selections change from step to step, so more history predicts more reads."""
    counts = {}
    for steps in (1, 8):
        kv = KVConfig(budget="30%", device_mb=0.02, host_mb=0.05, disk_dir=tmp_path / str(steps), bits="8", prefetch_steps=steps,
                      prefetch="on")
        _, _, cache = decode(TorchBackend(source, kv=kv), PROMPT, 40)
        assert cache.storage.prefetcher.steps == steps
        s = cache.stats()
        counts[steps] = s["prefetch_chunks"], s["prefetch_hits"]
        assert s["prefetch_hits"] + s["prefetch_unused"] == s["prefetch_chunks"]
        cache.close()
    assert counts[1][0] > 0 and counts[8][0] >= counts[1][0] and counts[8][1] >= counts[1][1]
    with pytest.raises(EdgetokError):
        KVConfig(prefetch_steps=0)


def test_uncached_disk_file_reads_the_device(tmp_path):
    disk = DiskFile(tmp_path, uncached=True)
    payloads = [Packed.of({"k": torch.randn(3, 256, 64), "v": torch.randn(3, 256, 64)}) for _ in range(8)]
    items = [(disk.write(p), p.layout) for p in payloads]
    before = process_read_bytes()
    for _ in range(2):  # the second read finds nothing cached either
        got = disk.read_many(items[::-1])[::-1]
        for p, g in zip(payloads, got):
            assert torch.equal(p["k"], g["k"]) and torch.equal(p["v"], g["v"])
            assert g.buffer.untyped_storage().nbytes() > g.nbytes  # neighbours came in one read, one buffer
    after = process_read_bytes()
    if before is not None and not on_tmpfs(tmp_path):
        assert after - before >= 2 * sum(p.nbytes for p in payloads) * 0.9
    disk.close()
    assert list(tmp_path.iterdir()) == []


def test_short_disk_writes_and_reads_are_errors(tmp_path, monkeypatch):
    """A disk that takes part of a write, or a file cut short under the cache: a sentence, not an assert."""
    disk = DiskFile(tmp_path)
    payload = Packed.of({"k": torch.randn(2, 16, 8), "v": torch.randn(2, 16, 8)})
    offset = disk.write(payload)
    os.ftruncate(disk.fd, payload.nbytes - 1)
    with pytest.raises(EdgetokError, match="truncated"):
        disk.read_many([(offset, payload.layout)])
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: len(data) // 2)
    with pytest.raises(EdgetokError, match="disk is full"):
        disk.write(payload)
    monkeypatch.undo()
    disk.close()


def test_cli_disk_uncached(tiny_folder, tmp_path):
    r = run_cli("run", str(tiny_folder), "-p", "The quick brown fox", "--no-chat", "-n", "8",
                                 "--kv-budget", "50%", "--kv-device-mb", "0.01", "--kv-host-mb", "0.01",
                                 "--kv-disk", str(tmp_path), "--kv-disk-uncached", "--json")
    assert r.exit_code == 0, r.output
    kv = json.loads(r.stdout)["stats"]["kv"]
    assert kv["disk_uncached"] is True and set(DISK_STATS) <= set(kv)
    r = run_cli("run", str(tiny_folder), "-p", "hi", "--kv-budget", "50%", "--kv-disk-uncached")
    assert r.exit_code == 1 and "--kv-disk" in r.stderr
    with pytest.raises(EdgetokError):
        KVConfig(disk_uncached=True)


def test_cli_prefetch_steps_need_the_disk_tier(tiny_folder, tmp_path):
    r = run_cli("run", str(tiny_folder), "-p", "hi", "-n", "1", "--kv-prefetch-steps", "8")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "--kv-prefetch-steps applies to the KV disk tier" in r.stderr
    r = run_cli("run", str(tiny_folder), "-p", "hi", "-n", "1", "--no-chat", "--json", "--kv-prefetch-steps", "8",
                "--kv-budget", "50%", "--kv-host-mb", "0.01", "--kv-disk", tmp_path)
    assert r.exit_code == 0, r.output


def test_auto_prefetch_pauses_while_disk_reads_are_cpu_work_and_resumes_when_they_wait(tmp_path):
    """--kv-prefetch auto: reads out of the page cache (the model thread's CPU the whole time) pause
    the prefetch thread; reads that wait for the device resume it, not on one such read (the average
    has two thresholds) but on a few; on and off never change."""
    counters = Counters()
    auto = Prefetcher(None, 3, counters, mode="auto")
    assert auto.active  # until reads say otherwise
    for _ in range(10):
        auto.observe(1e-4, 0.95e-4)  # a copy out of the page cache
    assert not auto.active and counters["prefetch_paused_reads"] > 0
    auto.observe(5e-3, 1e-4)  # one read that waited
    assert not auto.active
    for _ in range(5):
        auto.observe(5e-3, 1e-4)
    assert auto.active
    on, off = Prefetcher(None, 3, Counters(), mode="on"), Prefetcher(None, 3, Counters(), mode="off")
    for _ in range(10):
        on.observe(1e-4, 1e-4)
        off.observe(5e-3, 0.0)
    assert on.active and not off.active
    for p in (auto, on, off):
        p.close()


def test_auto_prefetch_gives_the_same_tokens(source, tmp_path):  # noqa: F811
    want, want_logits, _ = decode(TorchBackend(source, kv=tiers(tmp_path / "on", prefetch="on")), PROMPT, 20)
    got, logits, cache = decode(TorchBackend(source, kv=tiers(tmp_path / "auto")), PROMPT, 20)
    assert got == want and torch.equal(logits, want_logits)
    assert cache.stats()["sync_disk_reads"] > 0
    assert cache.storage.prefetcher.waiting < 1.0  # the model thread's disk reads were timed and judged
    cache.close()
