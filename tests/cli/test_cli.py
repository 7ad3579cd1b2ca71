"""The command line, through click's runner and as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

EDGETOK = str(Path(sys.executable).parent / "edgetok")


def assert_user_error(result, fragment: str):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgetok: error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_run_json(tiny_folder):
    r = run_cli("run", tiny_folder, "-p", "The quick brown fox", "-n", "6", "--no-chat", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out["tokens"]) == 6 and out["finish_reason"] == "length"
    assert out["prompt_tokens"] > 0
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"):
        assert out["stats"][key] > 0


def test_run_streams_the_same_text(tiny_folder):
    as_json = json.loads(run_cli("run", tiny_folder, "-p", "fox", "-n", "8", "--no-chat", "--json").stdout)
    streamed = run_cli("run", tiny_folder, "-p", "fox", "-n", "8", "--no-chat")
    assert streamed.exit_code == 0
    assert streamed.stdout == as_json["text"] + "\n"


def test_chat_mode_uses_the_template(tiny_folder):
    chat = json.loads(run_cli("run", tiny_folder, "-p", "fox", "-n", "1", "--json").stdout)
    raw = json.loads(run_cli("run", tiny_folder, "-p", "fox", "-n", "1", "--no-chat", "--json").stdout)
    assert chat["prompt_tokens"] > raw["prompt_tokens"] + 5


def test_prompt_file_and_stdin(tiny_folder, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("The quick brown fox")
    a = json.loads(run_cli("run", tiny_folder, "-f", f, "-n", "4", "--no-chat", "--json").stdout)
    b = json.loads(run_cli("run", tiny_folder, "-n", "4", "--no-chat", "--json", input="The quick brown fox").stdout)
    assert a["tokens"] == b["tokens"]


def test_inspect(tiny_folder):
    r = run_cli("inspect", tiny_folder, "--json")
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["config"]["num_layers"] == 2 and info["tokenizer"]["chat_template"]
    text = run_cli("inspect", tiny_folder).stdout
    assert "architecture  llama, 2 layers" in text


def test_user_errors(tiny_folder, tmp_path):
    assert_user_error(run_cli("run", tmp_path / "missing", "-p", "hi"), "not found")
    (tmp_path / "notes.txt").write_text("hello")
    assert_user_error(run_cli("run", tmp_path / "notes.txt", "-p", "hi"), "not a model")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    assert_user_error(run_cli("inspect", bad), "damaged GGUF")
    assert_user_error(run_cli("run", tiny_folder, "-p", "fox " * 400, "--no-chat"), "context holds 256")
    assert_user_error(run_cli("run", tiny_folder, "-p", "   "), "empty")
    # -v's engine report comes after the refusals: a refused run says one sentence (found by test_fuzz)
    assert_user_error(run_cli("run", tiny_folder, "-p", "fox", "--no-chat", "--system", "be brief", "-v"), "--system")
    assert run_cli("run", tiny_folder, "-f", tmp_path / "nope.txt").exit_code == 2  # click's own usage error


@pytest.mark.slow
def test_real_process_answers_paris():
    p = subprocess.run(
        [EDGETOK, "run", "smollm2", "-p", "What is the capital of France?", "--max-new-tokens", "16"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout


def test_chat_keeps_history_and_resets(tiny_folder):
    import re

    r = run_cli("chat", tiny_folder, "-n", "3", "-v", input="hello there\nand again\n/reset\nhello there\n/exit\nnever read\n")
    assert r.exit_code == 0, r.output
    stats = [tuple(map(int, m)) for m in re.findall(r"prompt (\d+) tok \((\d+) reused\)", r.stderr)]
    assert len(stats) == 3  # /exit stopped reading
    (p1, _), (p2, reused2), (p3, reused3) = stats
    assert p2 > p1 and reused2 >= p1  # the second turn carries the first, and reuses its KV
    assert "history cleared" in r.stderr
    assert p3 == p1 and reused3 == 0  # after /reset the same message starts from scratch


@pytest.mark.slow
def test_real_process_chat():
    script = "What is the capital of France?\n/exit\n"
    p = subprocess.run([EDGETOK, "chat", "smollm2", "-n", "24"], input=script, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout


def test_real_process_error_is_one_line(tmp_path):
    p = subprocess.run([EDGETOK, "run", str(tmp_path / "missing.gguf"), "-p", "hi"], capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_a_flag_click_refuses_is_one_line_too(tiny_folder):
    r = run_cli("run", tiny_folder, "-p", "hi", "--top-k", "many")
    assert r.exit_code == 2 and "Traceback" not in r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("edgetok: error: Invalid value for '--top-k'") and line.endswith("run --help`")


@pytest.mark.parametrize("how", ["stdin", "-p", "file"])
def test_prompt_bytes_that_are_not_utf8_are_one_sentence(tiny_folder, tmp_path, how):
    data = b"caf\xc3 \xff\x00 binary"
    if how == "stdin":
        r = run_cli("run", tiny_folder, "-n", "2", input=data)
    elif how == "-p":  # what Python makes of command-line bytes that are not UTF-8
        r = run_cli("run", tiny_folder, "-n", "2", "-p", data.decode("utf-8", "surrogateescape"))
    else:
        (tmp_path / "p.txt").write_bytes(data)
        r = run_cli("run", tiny_folder, "-n", "2", "-f", tmp_path / "p.txt")
    assert_user_error(r, "is not UTF-8 text (byte 0xc3 at offset 3)")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--kv-budget", "nan%", "--kv-budget nan% (KVConfig.budget) is impossible"),
    ("--kv-budget", "inf", "--kv-budget inf (KVConfig.budget) is impossible"),
    ("--kv-budget", "0.5", "--kv-budget 0.5 (KVConfig.budget) is impossible"),
    ("--kv-device-mb", "nan", "--kv-device-mb (KVConfig.device_mb) must be a number of MB"),
    ("--temperature", "inf", "temperature must be a finite number ≥ 0, not inf"),
])
def test_numbers_that_are_not_numbers_are_refused_before_any_text(tiny_folder, flag, value, fragment):
    r = run_cli("run", tiny_folder, "-p", "hi", "-n", "4", flag, value)
    assert_user_error(r, fragment)
    assert r.stdout == ""


def test_provider_is_refused_on_the_torch_backend(tiny_folder):
    assert_user_error(run_cli("run", tiny_folder, "--backend", "torch", "-p", "hi", "--provider", "cuda"),
                      "the torch backend runs on the CPU")


@pytest.mark.parametrize("failure", ["ENOSPC", "short write", "EIO"])
def test_a_full_kv_disk_is_one_sentence(tiny_folder, tmp_path, monkeypatch, failure):
    """The disk (not what is tested) fails three ways; edgetok's answer is a sentence, and nothing stays."""
    import errno
    import os

    def pwrite(fd, data, offset):
        if failure == "short write":
            return len(data) // 3
        raise OSError(errno.ENOSPC if failure == "ENOSPC" else errno.EIO, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    r = run_cli("run", tiny_folder, "-p", "The quick brown fox " * 10, "--no-chat", "-n", "4",
                "--kv-disk", tmp_path, "--kv-host-mb", "0")
    assert_user_error(r, "the KV disk tier")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_chat_ends_the_reply_not_the_conversation(tiny_folder, monkeypatch):
    from edgetok.runtimes.backends.pytorch import TorchBackend

    real, calls = TorchBackend.forward, []

    def forward(self, tokens, cache, last=1):
        calls.append(len(tokens))
        if len(calls) == 4:  # the first reply's third decode step
            raise KeyboardInterrupt
        return real(self, tokens, cache, last)

    monkeypatch.setattr(TorchBackend, "forward", forward)
    r = run_cli("chat", tiny_folder, "--backend", "torch", "-n", "6", "-v", input="hello there\nand again\n")
    assert r.exit_code == 0, r.output
    assert "(reply stopped)" in r.stderr and r.stderr.count("prompt ") == 1  # the second turn's stats
    assert "Aborted" not in r.output


def test_an_existing_folder_as_a_gguf_output_is_named(tiny_folder, tmp_path):
    (tmp_path / "models").mkdir()
    r = run_cli("export", tiny_folder, "--format", "gguf", "--no-verify", "--force", "-o", tmp_path / "models")
    assert_user_error(r, f"{tmp_path / 'models'} is a folder, and this export writes a file")
    assert (tmp_path / "models").is_dir() and [p.name for p in tmp_path.iterdir()] == ["models"]
    (tmp_path / "notes").write_text("x")
    r = run_cli("export", tiny_folder, "--format", "gguf", "--no-verify", "-o", tmp_path / "notes" / "m.gguf")
    assert_user_error(r, "notes is a file, not a folder")


def test_help_shows_percentages_and_model_kinds():
    for command in ("run", "chat", "export", "bench"):
        r = run_cli(command, "--help")
        assert r.exit_code == 0 and "%%" not in r.stdout
    assert "ONNX export folder" in run_cli("run", "--help").stdout


def test_a_signal_wrapped_by_a_c_extension_still_ends_the_command(tiny_folder, monkeypatch):
    """SIGTERM landing while a C extension imports comes back as `ImportError: initialization
    failed` (pybind11): the command ends as for the signal, without that traceback."""
    from edgetok.models import sources

    def importing(*args, **kwargs):
        try:
            raise SystemExit(143)  # what the CLI's SIGTERM handler raises
        except SystemExit as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setattr(sources, "load_source", importing)
    r = run_cli("inspect", tiny_folder)
    assert r.exit_code == 143 and "Traceback" not in r.output and "ImportError" not in r.output
