"""The persistent prompt cache (--kv-store): reuse across processes, refusal of bad entries, atomicity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

EDGETOK = str(Path(sys.executable).parent / "edgetok")
PROMPT = "The quick brown fox jumps over the lazy dog. " * 12


def run_json(*args):
    r = run_cli("run", *map(str, args), "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("kv_args", [[], ["--kv-budget", "100%"], ["--kv-budget", "100%", "--kv-device-mb", "0.01"]])
def test_second_run_skips_prefill_with_same_output(tiny_folder, tmp_path, kv_args):
    args = [tiny_folder, "-p", PROMPT, "--no-chat", "-n", "12", "--kv-store", tmp_path, *kv_args]
    first = run_json(*args)
    assert first["stats"]["store_tokens"] == 0
    assert len(list(tmp_path.glob("*.kvstore"))) == 1
    second = run_json(*args)
    assert second["stats"]["store_tokens"] == second["prompt_tokens"] - 1  # only the last token ran
    assert second["tokens"] == first["tokens"]


def test_longer_prompt_reuses_a_stored_prefix(tiny_folder, tmp_path):
    run_json(tiny_folder, "-p", PROMPT, "--no-chat", "-n", "2", "--kv-store", tmp_path)
    longer = run_json(tiny_folder, "-p", PROMPT + " And then?", "--no-chat", "-n", "6", "--kv-store", tmp_path)
    assert 0 < longer["stats"]["store_tokens"] < longer["prompt_tokens"] - 1
    fresh = run_json(tiny_folder, "-p", PROMPT + " And then?", "--no-chat", "-n", "6")
    assert longer["tokens"] == fresh["tokens"]


@pytest.mark.parametrize("kv_args, at", [([], 0.5), (["--kv-budget", "100%"], 0.5), (["--kv-budget", "100%"], 1.0)])
def test_corrupt_entry_is_refused_then_rebuilt(tiny_folder, tmp_path, kv_args, at):
    """Any byte: a layer's K/V, or (the tiered cache's) observation queries at the end of the file."""
    args = [tiny_folder, "-p", PROMPT, "--no-chat", "-n", "4", "--kv-store", tmp_path, *kv_args]
    run_json(*args)
    entry = next(tmp_path.glob("*.kvstore"))
    data = bytearray(entry.read_bytes())
    data[min(int(len(data) * at), len(data) - 1)] ^= 0xFF  # flip a byte of the payload
    entry.write_bytes(bytes(data))
    r = run_cli("run", *map(str, args))
    assert r.exit_code == 1 and "--kv-store-rebuild" in r.stderr and "corrupt" in r.stderr, r.output
    rebuilt = run_json(*args, "--kv-store-rebuild")
    assert rebuilt["stats"]["store_tokens"] == 0
    again = run_json(*args)
    assert again["stats"]["store_tokens"] > 0


def test_a_prompt_read_from_the_store_counts_in_the_progress(tiny_folder, tmp_path):
    """A progress bar over the prompt reaches its end when most of it came from the store."""
    import edgetok

    for _ in range(2):
        m = edgetok.load(str(tiny_folder), backend="torch", kv_store=tmp_path)
        counted = []
        r = m.generate(PROMPT, max_new_tokens=2, progress=counted.append)
        assert sum(counted) == r.prompt_tokens
    assert r.stats.store_tokens == r.prompt_tokens - 1


def test_mismatched_header_is_refused(tiny_folder, tmp_path):
    run_json(tiny_folder, "-p", PROMPT, "--no-chat", "-n", "2", "--kv-store", tmp_path)
    entry = next(tmp_path.glob("*.kvstore"))
    raw = entry.read_bytes()
    line, rest = raw.split(b"\n", 1)
    header = json.loads(line)
    header["version"] = 99
    entry.write_bytes(json.dumps(header).encode() + b"\n" + rest)
    r = run_cli("run", str(tiny_folder), "-p", PROMPT, "--no-chat", "-n", "2", "--kv-store", str(tmp_path))
    assert r.exit_code == 1 and "format version 99" in r.stderr


def test_interrupted_write_leaves_the_store_usable(tiny_folder, tmp_path):
    first = run_json(tiny_folder, "-p", PROMPT, "--no-chat", "-n", "3", "--kv-store", tmp_path)
    (entry,) = tmp_path.glob("*.kvstore")
    entry.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".{entry.name}.{dead}.abc123de"
    stale.write_bytes(b"half a file")  # what a writer killed mid-write leaves
    again = run_json(tiny_folder, "-p", PROMPT, "--no-chat", "-n", "3", "--kv-store", tmp_path)
    assert again["stats"]["store_tokens"] == 0 and not stale.exists()  # ignored, then removed by the save
    second = run_json(tiny_folder, "-p", PROMPT, "--no-chat", "-n", "3", "--kv-store", tmp_path)
    assert second["stats"]["store_tokens"] > 0 and second["tokens"] == first["tokens"]


def test_two_processes_share_a_store(tiny_folder, tmp_path):
    cmd = [EDGETOK, "run", str(tiny_folder), "-p", PROMPT, "--no-chat", "-n", "3", "--kv-store", str(tmp_path), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(list(tmp_path.glob("*.kvstore"))) == 1
    assert [p.name for p in tmp_path.glob(".*")] == [".lock"]  # no temporary
    tokens = [json.loads(o)["tokens"] for o, _ in outs]
    assert tokens[0] == tokens[1]


def test_another_model_does_not_see_the_entry(tiny_folder, tmp_path, gguf_of_tiny):
    run_json(tiny_folder, "-p", PROMPT, "--no-chat", "-n", "2", "--kv-store", tmp_path)
    other = run_json(gguf_of_tiny, "-p", PROMPT, "--no-chat", "-n", "2", "--kv-store", tmp_path)
    assert other["stats"]["store_tokens"] == 0


@pytest.fixture(scope="module")
def gguf_of_tiny(tiny_folder, tmp_path_factory):
    from edgetok.exporters.gguf import export_gguf
    from edgetok.models.sources import load_source

    return export_gguf(load_source(str(tiny_folder)), tmp_path_factory.mktemp("g") / "tiny.gguf", "f16")


# -- a budgeted cache with sliding-window layers (Gemma 3): the windows are stored as they are ------
def test_budgeted_gemma_cache_round_trips_through_the_store(tiny_gemma_folder, tmp_path):
    """A prompt long enough that the sliding layers (window 8) dropped tokens: stored, then loaded
    into a fresh cache (all but its last token, as a rerun does), the next logits and the greedy
    decode after them are identical to the cache that prefilled it."""
    import torch

    import edgetok
    from edgetok.runtimes.kv import KVConfig, MixedCache
    from edgetok.runtimes.kv.store import PromptStore

    model = edgetok.load(str(tiny_gemma_folder), backend="torch", kv=KVConfig(budget="25%", chunk_sizes=(8, 16)))
    backend = model.engine.backend
    ids = model.tokenizer.encode(PROMPT * 3)
    n = len(ids) - 1
    store = PromptStore(tmp_path, "tiny-gemma", backend.new_cache().kv_dtype)

    def greedy(cache, logits, steps=8) -> tuple[list[int], list[torch.Tensor]]:
        backend.end_prefill(cache)
        tokens, rows = [], []
        for _ in range(steps):
            rows.append(torch.as_tensor(logits).clone())
            tokens.append(int(logits.argmax()))
            logits = backend.forward([tokens[-1]], cache)[-1]
        return tokens, rows

    first = backend.new_cache()
    assert isinstance(first, MixedCache)
    for i in range(0, n, 40):
        backend.forward(ids[i : min(i + 40, n)], first)
    state = backend.save_prefix(first)
    assert max(state.starts) > 0 and min(state.starts) == 0  # windows that dropped tokens, full layers that did not
    store.save(ids[:n], state)
    want = greedy(first, backend.forward(ids[n:], first)[-1])

    entry = store.lookup(ids)
    loaded = store.load(entry, n)
    second = backend.new_cache()
    backend.load_prefix(second, loaded)
    assert second.length == n
    got = greedy(second, backend.forward(ids[n:], second)[-1])
    assert got[0] == want[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert store.load(entry, 20) is None  # a short prefix: the windows no longer reach back to it
    first.close()
    second.close()


def test_gemma_budgeted_cache_reruns_from_the_store(tiny_gemma_folder, tmp_path):
    """The command line's run, twice (the windows that dropped tokens: the test above)."""
    args = [tiny_gemma_folder, "--backend", "torch", "-p", PROMPT, "--no-chat", "-n", "12", "--kv-store", tmp_path,
            "--kv-budget", "25%"]
    first = run_json(*args)
    second = run_json(*args)
    assert second["stats"]["store_tokens"] == second["prompt_tokens"] - 1
    assert second["tokens"] == first["tokens"]
