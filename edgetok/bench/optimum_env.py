"""The optimum-onnx peer's own environment: where its interpreter is, and whether it is ready.

optimum-onnx needs transformers < 4.58, older than edgetok's, so it lives in a virtualenv of its
own, `make optimum-env`'s .venv-optimum beside edgetok's source ($EDGETOK_OPTIMUM_PYTHON names
another interpreter). edgetok's source is on that interpreter's path, so the peer's runner is
edgetok.bench.peers there: timed by the same code as every other peer.
"""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path

import edgetok
from edgetok.errors import EdgetokError

PYTHON_VAR = "EDGETOK_OPTIMUM_PYTHON"
MAKE_TARGET = "make optimum-env"
VENV = ".venv-optimum"
# what the peer imports there, and the version that keys its export in the bench cache
_PROBE = ("import importlib.metadata as m, importlib.util as u; "
          "assert u.find_spec('optimum.onnxruntime') and u.find_spec('edgetok.bench.peers') and u.find_spec('click'); "
          "print(m.version('optimum-onnx'))")


def python() -> Path:
    """The environment's interpreter (it may not exist)."""
    named = os.environ.get(PYTHON_VAR)
    return Path(named) if named else Path(edgetok.__file__).resolve().parents[1] / VENV / "bin" / "python"


@cache
def _probe(interpreter: Path) -> str | None:
    """optimum-onnx's version there, or None when the interpreter is missing or lacks what the peer imports."""
    if not interpreter.is_file():
        return None
    p = subprocess.run([str(interpreter), "-c", _PROBE], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    return p.stdout.strip() or None


def ready() -> bool:
    return _probe(python()) is not None


def missing() -> str:
    """The sentence that says how to build the environment."""
    return (f"optimum-onnx runs in an environment of its own ({python()}), which is missing or incomplete; "
            f"run: {MAKE_TARGET} (or set {PYTHON_VAR} to a python with optimum-onnx and edgetok's source on its path)")


def found_version() -> str | None:
    """optimum-onnx's version in the environment, or None when it is not ready."""
    return _probe(python())


def version() -> str:
    """optimum-onnx's version in the environment (EdgetokError when it is not ready)."""
    found = _probe(python())
    if found is None:
        raise EdgetokError(missing())
    return found
