"""Fuzzing the command line: whatever values `edgetok run` and `chat` get, they end with exit
status 0 or one line `edgetok: error: …` — never a traceback — and leave nothing behind in the
working folder, the KV disk folder, the KV store (but its entries) or $EDGETOK_HOME."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

NUMBER = st.sampled_from(["0", "1", "2", "7", "40", "-1", "0.5", "1e9", "1e309", "nan", "inf", "-inf", "", "x", " 3 ", "0x10"])
PERCENT = st.sampled_from(["25%", "50%", "100%", "0%", "nan%", "150%", "-5%", "25 %", "%", "64", "0.5", "inf"])
TEXT = st.text(max_size=8)


def mostly(valid, bad):
    """`valid` nine times in ten: most runs get past the flags, to where the deeper bugs are."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 5 else valid)  # (not at a bound: hypothesis favours those)


def numbers(*valid: str):
    return mostly(st.sampled_from(valid), NUMBER | TEXT)


# flag → its values (each example gives a few flags)
OPTIONS = {
    "--max-new-tokens": numbers("0", "1", "5", "20"),
    "--temperature": numbers("0", "0.7", "1", "2.5", "1e-30"),
    "--top-k": numbers("0", "1", "5", "1000"),
    "--top-p": numbers("1", "0.9", "0.01"),
    "--min-p": numbers("0", "0.1", "1"),
    "--repetition-penalty": numbers("1", "1.3", "0.5", "1e-30", "1e30"),
    "--seed": numbers("0", "1", "123456789", "9223372036854775807"),
    "--stop": mostly(st.sampled_from(["e", ".", "\n", "the"]), TEXT),
    "--threads": numbers("1", "2"),
    "--backend": mostly(st.sampled_from(["torch", "llamacpp"]), st.sampled_from(["onnxruntime", "tf"])),
    "--provider": mostly(st.sampled_from(["cpu"]), st.sampled_from(["cuda", "auto", "npu"])),
    "--plan": mostly(st.sampled_from(["auto", "none"]), st.sampled_from(["missing.json", "", "auto "])),
    "--weights": mostly(st.sampled_from(["fp32", "bf16", "int8"]), st.sampled_from(["int4", "fp64"])),
    "--kv-type": mostly(st.sampled_from(["f16", "q8_0"]), st.sampled_from(["q4_0", "f64"])),
    "--kv-budget": mostly(st.sampled_from(["25%", "50%", "100%", "64", "200", "auto"]), PERCENT | TEXT),
    "--kv-coverage": numbers("0.9", "0.5", "0.99"),
    "--kv-device-mb": numbers("0", "0.01", "1"),
    "--kv-host-mb": numbers("0", "0.01", "1"),
    "--kv-bits": mostly(st.sampled_from(["auto", "32", "16", "8", "4", "2"]), st.sampled_from(["3", "x"])),
    "--kv-prefetch": mostly(st.sampled_from(["auto", "on", "off"]), st.sampled_from(["yes", ""])),
    "--kv-op-provider": mostly(st.sampled_from(["CPUExecutionProvider"]), st.sampled_from(["QNNExecutionProvider", ""])),
    "--kv-prefetch-steps": numbers("1", "3"),
    "--kv-summaries": mostly(st.sampled_from(["on", "off"]), st.sampled_from(["yes", ""])),
    "--kv-selection": mostly(st.sampled_from(["layer", "head"]), st.sampled_from(["heads", ""])),
    "--prune-prompt": numbers("0.5", "1", "0.1"),
    "--prune-after-layer": numbers("0", "1"),
    "--system": mostly(st.sampled_from(["be brief"]), TEXT),
    "--speculate": mostly(st.sampled_from(["none", "lookup", "recycle"]), st.sampled_from(["medusa", ""])),
    "--draft-max": numbers("1", "4", "8"),
    "--lookup-ngram-min": numbers("1", "2"),
    "--lookup-ngram-max": numbers("2", "4"),
}
FLAGS = ["--kv-disk", "--kv-store", "--kv-store-rebuild", "--kv-disk-uncached", "--json", "--no-chat", "--chat", "-v"]
PROMPT_TEXT = st.one_of(st.sampled_from(["The quick brown fox", "Émile paid 12,345 €", "fox " * 30, "def f(x):\n  return x"]),
                        st.text(max_size=30).filter(str.strip))
# how the prompt arrives: -p text (a lone surrogate is what Python makes of argv bytes that are not
# UTF-8), or stdin bytes (binary, or cut inside a character)
PROMPT = st.one_of(
    st.tuples(st.just("-p"), mostly(PROMPT_TEXT, st.sampled_from(["", "   ", "a\udcffb", "\x00"]))),
    st.tuples(st.just("stdin"), mostly(PROMPT_TEXT.map(str.encode),
                                       st.binary(max_size=40) | st.just("café".encode()[:-1]))),
)


@pytest.fixture(scope="module")
def models(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as an HF folder and as a GGUF (converted on load, runnable by llama.cpp)."""
    from edgetok.exporters.gguf import export_gguf
    from edgetok.models.sources import load_source

    return {"hf": tiny_folder, "gguf": export_gguf(load_source(str(tiny_folder)), tmp_path_factory.mktemp("g") / "tiny.gguf", "f16")}


@pytest.fixture(scope="module")
def home(models, tmp_path_factory) -> Path:
    """An $EDGETOK_HOME of these tests' own, with the GGUF converted already (the conversion's
    progress bar on stderr is no error message)."""
    from edgetok.models.sources import load_source

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETOK_HOME", str(home))
        load_source(str(models["gguf"]))
    return home


@pytest.fixture()
def places(tmp_path, home, monkeypatch):
    """A working folder, a KV disk folder and a KV store of this test's own, and the tests' home."""
    folders = {name: tmp_path / name for name in ("work", "kv-disk", "kv-store")} | {"home": home}
    for name in ("work", "kv-disk", "kv-store"):
        folders[name].mkdir()
    monkeypatch.chdir(folders["work"])
    monkeypatch.setenv("EDGETOK_HOME", str(home))
    return folders


def leftovers(places: dict[str, Path]) -> list[Path]:
    """What a run left that it should not have: anything in the working and disk folders, in the
    store anything but its entries and its lock file, and in $EDGETOK_HOME (converted models,
    hash stamps) any temporary."""
    found = [p for name in ("work", "kv-disk") for p in places[name].rglob("*")]
    found += [p for p in places["home"].rglob(".*")]
    return found + [p for p in places["kv-store"].iterdir() if p.name != ".lock" and p.suffix != ".kvstore"]


def check_outcome(r) -> None:
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    if r.exit_code == 0:
        event("ran")
        return
    event("refused")
    event(r.stderr.strip()[:60])  # which refusals the examples reached (--hypothesis-show-statistics)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("edgetok: warning:")]
    assert r.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("edgetok: error: "), r.stderr


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=4).flatmap(
           lambda chosen: st.fixed_dictionaries({flag: OPTIONS[flag] for flag in chosen})),
       flags=st.lists(st.sampled_from(FLAGS), max_size=3, unique=True), prompt=PROMPT, model=st.sampled_from(["hf", "gguf"]))
def test_run_ends_in_a_result_or_one_sentence(models, places, options, flags, prompt, model):
    args = ["run", models[model], "-n", "8"]
    for flag, value in options.items():
        args += [flag, value]
    for flag in flags:
        args += [flag, places[flag.removeprefix("--")]] if flag in ("--kv-disk", "--kv-store") else [flag]
    how, text = prompt
    r = run_cli(*args, "-p", text) if how == "-p" else run_cli(*args, input=text)
    check_outcome(r)
    if r.exit_code == 0 and "--json" in flags:
        assert json.loads(r.stdout)["finish_reason"] in ("eos", "stop", "length")
    assert leftovers(places) == []


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(mostly(st.sampled_from([b"hello there", b"/reset", b"and again", b"   ", b"/exit"]),
                             st.binary(max_size=12)), max_size=4))
def test_chat_ends_in_replies_or_one_sentence(tiny_folder, places, lines):
    r = run_cli("chat", tiny_folder, "-n", "4", "--kv-disk", places["kv-disk"], input=b"\n".join(lines) + b"\n")
    check_outcome(r)
    assert leftovers(places) == []


def test_places_are_really_checked(places):
    """The harness would see what a run leaves: a temporary in the working folder, a disk file."""
    (places["work"] / ".x.1.tmp").write_text("left")
    (places["home"] / "converted" / ".abc-0.1.0.1.xyz").mkdir()
    (places["kv-disk"] / "edgetok-kv-1-abc.bin").write_bytes(b"\0")
    (places["kv-store"] / ".entry.kvstore.1.abc").write_bytes(b"\0")
    assert sorted(p.name for p in leftovers(places)) == [".abc-0.1.0.1.xyz", ".entry.kvstore.1.abc", ".x.1.tmp",
                                                         "edgetok-kv-1-abc.bin"]
    assert os.getcwd() == str(places["work"])
    (places["home"] / "converted" / ".abc-0.1.0.1.xyz").rmdir()


JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


@st.composite
def device_profiles(draw) -> object:
    """A catalog profile with a field changed, dropped or added (most of the time), or any JSON."""
    from edgetok.devices.catalog import CATALOG

    profile = dict(draw(st.sampled_from(json.loads(CATALOG.read_text())["profiles"])))
    how = draw(st.sampled_from(["as is", "change", "change", "drop", "add", "any JSON"]))
    field = draw(st.sampled_from(sorted(profile)))
    if how == "change":
        profile[field] = draw(JSON | st.sampled_from([0, -1, 1e9, 0.5, "8"]))
    elif how == "drop":
        del profile[field]
    elif how == "add":
        profile[draw(st.text(max_size=8))] = draw(JSON)
    return draw(JSON) if how == "any JSON" else profile


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(device=mostly(st.sampled_from(["rtx4090", "raspberry-pi-5-8gb", "apple-m2-16gb", "file"]),
                     st.sampled_from(["", "nope", "missing.json", "file.txt"])),
       profile=device_profiles(), context=st.one_of(st.none(), numbers("64", "256", "4096", "100000")),
       threads=st.one_of(st.none(), numbers("1", "4")), model=st.sampled_from(["hf", "gguf"]))
def test_plan_ends_in_a_plan_or_one_sentence(models, places, tmp_path, device, profile, context, threads, model):
    profiles = tmp_path / "profiles"
    profiles.mkdir(exist_ok=True)
    if device in ("file", "file.txt"):
        path = profiles / ("p.json" if device == "file" else "p.txt")
        path.write_bytes(json.dumps(profile).encode() if device == "file" else b"\xff\xfe not json")
        device = str(path)
    args = ["plan", models[model], "--device", device, "--json"]
    args += ["--context", context] if context is not None else []
    args += ["--threads", threads] if threads is not None else []
    r = run_cli(*args)
    check_outcome(r)
    if r.exit_code == 0:
        assert json.loads(r.stdout)["run_options"]
    assert leftovers(places) == []
