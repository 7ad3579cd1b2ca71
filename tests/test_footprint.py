"""The default engine's footprint: once its export is built, `edgetok run` / `chat` / `serve` and
load() + generate() run on numpy + ONNX Runtime (+ the native kernel) and never import torch; in
an environment without torch the default engine answers the same, and what needs torch (building
the export, the tiered cache, the torch backend) says so in one sentence."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import in_threads

import edgetok
from tests.serve.serving import Server, request

PROMPT = "The quick brown fox jumps over the lazy dog"
TOKENS = 8
REPO = Path(edgetok.__file__).resolve().parent.parent
CLI = "from edgetok.cli import main; main()"


def torch_imports(stderr: str) -> list[str]:
    """The torch modules `python -X importtime` reports as imported."""
    found = (m.group(1) for m in re.finditer(r"^import time:\s*\d+ \|\s*\d+ \|\s*(\S+)", stderr, re.M))
    return [name for name in found if name == "torch" or name.startswith("torch.")]


def python(*args: str, env: dict | None = None, flags: tuple[str, ...] = ("-X", "importtime"), stdin: str | None = None):
    return subprocess.run([sys.executable, *flags, *args], capture_output=True, text=True, timeout=300, input=stdin,
                          env=os.environ | {"PYTHONPATH": str(REPO)} | (env or {}))


@pytest.fixture(scope="module")
def built(tiny_folder):
    """The tiny model's default export, built in this process (torch present) under the session's
    $EDGETOK_HOME, and the greedy tokens it answers PROMPT with."""
    model = edgetok.load(str(tiny_folder))
    assert model.choice.backend == "onnxruntime" and model.choice.artifact
    return model.choice.artifact, model.generate(PROMPT, max_new_tokens=TOKENS).tokens


def test_load_and_generate_import_no_torch(tiny_folder, built):
    _, want = built
    code = (f"import json, edgetok; m = edgetok.load({str(tiny_folder)!r}); "
            f"print(json.dumps(m.generate({PROMPT!r}, max_new_tokens={TOKENS}).tokens))")
    p = python("-c", code)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout) == want
    assert torch_imports(p.stderr) == []
    assert "onnxruntime" in p.stderr  # (the check reads the real import log)


@pytest.mark.parametrize("model", ["source", "export folder"])
def test_run_and_chat_import_no_torch(tiny_folder, built, model):
    path = str(tiny_folder) if model == "source" else built[0]
    p = python("-c", CLI, "run", path, "-p", PROMPT, "-n", str(TOKENS), "--no-chat", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["tokens"] == built[1]
    assert torch_imports(p.stderr) == []
    p = python("-c", CLI, "chat", path, "-n", "4", stdin="hello\nand again\n")
    assert p.returncode == 0, p.stderr[-2000:]
    assert torch_imports(p.stderr) == []


def test_serve_batches_without_torch(built, tmp_path, monkeypatch):
    """Concurrent requests decode in batched steps (onnx_batch.py), and the server never imports torch."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # `-X importtime` for the server's process
    log = tmp_path / "server.log"
    server = Server(built[0], "--alias", "tiny", "--metrics", "--max-sequences", 4, log=log)
    try:
        answers = {}

        def ask(i: int) -> None:
            body = {"model": "tiny", "prompt": f"{PROMPT} {i}", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            status, _, data = request(server.port, "POST", "/v1/completions", body)
            answers[i] = (status, json.loads(data))

        in_threads(ask, 4, timeout=300)
        steps, tokens = server.metric("decode_steps_total"), server.metric("decoded_tokens_total")
    finally:
        server.stop()
    assert all(status == 200 for status, _ in answers.values()), answers
    assert tokens > steps  # several sequences per step: batched
    assert torch_imports(log.read_text()) == []


# -- where torch is not installed ------------------------------------------------------------------
@pytest.fixture(scope="module")
def without_torch(tmp_path_factory) -> Path:
    """A folder that holds every installed package except torch (links), for `python -S`: an
    environment where torch is not installed."""
    farm = tmp_path_factory.mktemp("no-torch")
    roots = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    for root in roots:
        for entry in Path(root).iterdir():
            if re.match(r"(torch|functorch|torchgen)([-_.]|$)", entry.name, re.I) or entry.suffix == ".pth":
                continue
            if not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry)
    return farm


def run_without_torch(farm: Path, *args, home: Path | None = None):
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{farm}"} | ({"EDGETOK_HOME": str(home)} if home else {})
    return python("-c", CLI, *map(str, args), env=env, flags=("-S",))


def test_without_torch_the_default_engine_runs_and_the_rest_says_what_to_install(tiny_folder, built, without_torch, tmp_path):
    p = python("-c", "import torch", env={"PYTHONPATH": f"{REPO}{os.pathsep}{without_torch}"}, flags=("-S",))
    assert p.returncode == 1 and "No module named 'torch'" in p.stderr  # the environment lacks it
    p = run_without_torch(without_torch, "run", tiny_folder, "-p", PROMPT, "-n", TOKENS, "--no-chat", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["tokens"] == built[1]

    for extra in (["--kv-budget", "25%"], ["--backend", "torch"]):
        p = run_without_torch(without_torch, "run", tiny_folder, "-p", PROMPT, "-n", 2, *extra)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert p.stderr.count("\n") == 1 and "pip install 'edgetok[export]'" in p.stderr, p.stderr

    # nothing built yet: building the export needs torch; nothing is left half-written
    home = tmp_path / "home"
    p = run_without_torch(without_torch, "run", tiny_folder, "-p", PROMPT, "-n", 2, home=home)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.count("\n") == 1 and "building the default export" in p.stderr and "edgetok[export]" in p.stderr
    assert [f.name for f in (home / "exports").iterdir() if not f.name.endswith(".lock")] == []
