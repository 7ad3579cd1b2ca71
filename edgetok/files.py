"""Reading and writing files so that readers see a whole artifact or none of it.

Shared by the exporters, the model loader (models/sources.py) and the bench: one place for the
temporary-then-rename dance, the "exists; pass --force" refusal and the hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgetok.errors import EdgetokError


def progress_bar(desc: str):
    """A `progress(iterable, total)` callable drawing on stderr (stdout may be JSON)."""
    from tqdm import tqdm

    return lambda it, total: tqdm(it, total=total, desc=desc, file=sys.stderr, leave=False)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgetokError(f"cannot read {path}: {e}") from None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for everyone who reads the folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Writers check before any work (loading a model takes a while), and again when they commit."""
    for path in paths:
        if path.exists() and not force:
            raise EdgetokError(f"{path} exists; pass --force to overwrite it")


@contextmanager
def staged(outputs: list[Path], force: bool = False) -> Iterator[list[Path]]:
    """Temporary paths for `outputs` (files or folders, all in one folder), inside a hidden folder
    beside them. On success each is renamed onto its output, in order (replacing an old one only
    with force); on any error, or after, the hidden folder is removed: nothing half-written stays."""
    refuse_existing(outputs, force)
    parent = outputs[0].parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outputs[0].name}.", dir=parent))
    try:
        paths = [tmp / out.name for out in outputs]
        yield paths
        for path, out in zip(paths, outputs):
            if path.is_dir():
                os.chmod(path, 0o755)  # whatever the umask: an export is for everyone who reads the folder
            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out)
            elif path.is_dir() and (out.exists() or out.is_symlink()):
                out.unlink()  # a rename replaces a file by a file (atomically) only
            os.replace(path, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """An empty temporary folder that becomes `out` on success (see `staged`)."""
    with staged([out], force) as (folder,):
        folder.mkdir()
        yield folder
