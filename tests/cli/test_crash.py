"""Killing edgetok (real processes): a signal ends a run through its cleanup, kill -9 leaves
nothing that the next run trips over or that stays forever, and an artifact is whole or absent.

The moments are random within a bounded window once the process is at work (generating, or
writing its temporaries), from a seeded generator: the seed is in the test's name, so a failure
can be replayed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

EDGETOK = str(Path(sys.executable).parent / "edgetok")
PROMPT = "The quick brown fox jumps over the lazy dog. Émile paid 12,345 € for a café near the station. " * 2


def start(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([EDGETOK, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for(condition, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def open_files(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    return [os.readlink(fd) for fd in fds.iterdir()] if fds.is_dir() else []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")
def test_sigterm_ends_a_session_through_its_cleanup(tiny_folder, tmp_path):
    """A chat holding a KV disk file: its file was never visible (unlinked while open), and SIGTERM
    ends it with status 143 and no traceback."""
    disk = tmp_path / "kv"
    p = start("chat", tiny_folder, "-n", "4", "--kv-disk", disk, "--kv-host-mb", "0", stdin=subprocess.PIPE)
    p.stdin.write((PROMPT + "\n").encode())
    p.stdin.flush()
    p.stdout.readline()  # a reply: the cache, and its disk file, exist
    held = [f for f in open_files(p.pid) if f.startswith(str(disk))]
    assert len(held) == 1 and held[0].endswith("(deleted)") and "edgetok-kv-" in held[0]
    assert list(disk.iterdir()) == []
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err.decode(), err.decode()


@pytest.mark.parametrize("seed", [1, 2])
def test_a_run_killed_at_any_moment_leaves_no_disk_file(tiny_folder, tmp_path, seed):
    disk = tmp_path / "kv"
    p = start("run", tiny_folder, "-p", PROMPT * 3, "--no-chat", "-n", "100", "--kv-disk", disk, "--kv-host-mb", "0")
    p.stdout.read(1)  # generating: the moment is within the run, not its start-up
    time.sleep(random.Random(seed).uniform(0, 0.2))
    p.kill()
    p.wait(timeout=60)
    assert not disk.exists() or list(disk.iterdir()) == []
    r = run_cli("run", tiny_folder, "-p", PROMPT, "--no-chat", "-n", "4", "--kv-disk", disk, "--kv-host-mb", "0")
    assert r.exit_code == 0, r.output
    assert list(disk.iterdir()) == []


def export_args(fmt: str, out: Path) -> list:
    return ["--format", fmt, "--eval-tokens", "64", "-o", out] + (["--weights", "fp32"] if fmt == "onnx" else [])


def assert_whole_or_absent(fmt: str, out: Path) -> None:
    """An artifact that exists loads (its hashes hold) and has its report; else it is absent."""
    from edgetok.models.sources import load_source

    if fmt == "gguf" and out.exists():
        assert out.with_name(out.name + ".json").is_file()
    if out.exists():
        assert load_source(str(out)).config.num_layers == 2


@pytest.mark.parametrize("fmt, moment", [("gguf", "random 3"), ("onnx", "random 4"), ("onnx", "while writing")])
def test_an_export_killed_at_any_moment_is_whole_or_absent_and_cleaned_up_next_time(tiny_folder, tmp_path, fmt, moment):
    out = tmp_path / f"m.{fmt}"
    p = start("export", tiny_folder, *export_args(fmt, out))
    wait_for(lambda: any(f.name.startswith(f".{out.name}.") for f in tmp_path.iterdir()) or p.poll() is not None)
    if moment != "while writing":  # writing, verifying, renaming, or done
        time.sleep(random.Random(int(moment.split()[1])).uniform(0, 1.5))
    p.kill()
    p.wait(timeout=60)
    if moment == "while writing":
        assert any(f.name.startswith(f".{out.name}.") for f in tmp_path.iterdir())  # what kill -9 leaves ...
    assert_whole_or_absent(fmt, out)
    again = run_cli("export", tiny_folder, *export_args(fmt, out), "--no-verify", *(["--force"] if out.exists() else []))
    assert again.exit_code == 0, again.output
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == ([out.name, out.name + ".json"] if fmt == "gguf" else [out.name])  # ... the next export removes
    assert_whole_or_absent(fmt, out)


def test_sigterm_during_an_export_removes_its_temporaries(tiny_folder, tmp_path):
    out = tmp_path / "m.onnx"
    p = start("export", tiny_folder, *export_args("onnx", out))
    wait_for(lambda: any(f.name.startswith(".m.onnx.") for f in tmp_path.iterdir()))
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err.decode(), err.decode()
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_goes_away_ends_the_run_quietly(tiny_folder):
    """`edgetok run … | head -c 10`: the pipe closes before the text is written."""
    p = start("run", tiny_folder, "-p", PROMPT, "--no-chat", "-n", "50")
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert p.returncode == 1 and err == "", err
