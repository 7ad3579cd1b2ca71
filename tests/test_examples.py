"""The examples run as a user runs them (on the tiny random model, so they are fast); the one that
talks to `edgetok serve` is run by tests/serve/test_server.py against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_embedding_example_streams_stops_and_shares_the_model(tiny_folder):
    p = subprocess.run([sys.executable, str(EXAMPLES / "embed.py"), str(tiny_folder)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "answer: " in p.stdout and "stopped: [cancelled" in p.stdout and "each got its own answer" in p.stdout
