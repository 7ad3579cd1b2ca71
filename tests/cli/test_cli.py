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
