"""Reading and writing files so that readers see a whole artifact or none of it.

Shared by the exporters, the model loader (models/sources.py), the KV store and the bench: one
place for the temporary-then-rename dance, the "exists; pass --force" refusal and the hashes.

Temporaries are hidden names beside their target that carry the writer's process id
(`.NAME.PID.RANDOM`): a writer killed before it could clean up (kill -9, a power cut) leaves one,
and the next writer into the same place removes those whose process is gone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgetok.errors import EdgetokError


def edgetok_home() -> Path:
    """Where edgetok keeps what it can rebuild: converted models, hash stamps, bench artifacts."""
    return Path(os.environ.get("EDGETOK_HOME", "~/.cache/edgetok")).expanduser()


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgetokError(f"cannot read {path}: {e}") from None


# -- temporaries ---------------------------------------------------------------------------------
def temporary_prefix(target: Path) -> str:
    """The prefix of `target`'s temporaries (mkstemp / mkdtemp add a random part)."""
    return f".{target.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; not a pid at all: keep it
        return True
    return True


def remove_stale(target: Path) -> None:
    """Remove the temporaries of `target` left by writers that died (their pid is gone). A pid reused
    since by a live process keeps its temporary until that process ends too: never a live writer's."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d{{1,10}})\.[a-z0-9_]{{8}}")  # mkstemp's 8 characters
    try:
        candidates = list(target.parent.iterdir())
    except OSError:
        return
    for path in candidates:
        m = pattern.fullmatch(path.name)
        if m is None or _alive(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for everyone who reads the folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- artifacts -----------------------------------------------------------------------------------
def refuse_existing(paths: list[Path], force: bool, marker: str | None = None) -> None:
    """Writers check before any work (loading a model takes a while), and again when they commit.

    marker: the outputs are folders, and an existing folder is replaced (with force) only if it
    holds this file — so --force never deletes a folder that is not an export. None: the outputs
    are files, and an existing folder in their place is refused."""
    for path in paths:
        if not (path.exists() or path.is_symlink()):
            continue
        if marker is None and path.is_dir():
            raise EdgetokError(f"{path} is a folder, and this export writes a file: give a file name, "
                               f"such as {path / 'model.gguf'}")
        if marker is not None and not path.is_dir():
            raise EdgetokError(f"{path} is a file, and this export writes a folder: give another name")
        if not force:
            raise EdgetokError(f"{path} exists; pass --force to overwrite it")
        if marker is not None and not (path / marker).is_file() and any(path.iterdir()):
            raise EdgetokError(f"{path} is a folder that holds no export ({marker} is missing); --force replaces "
                               "only an export: choose another name")


@contextmanager
def staged(outputs: list[Path], force: bool = False, marker: str | None = None) -> Iterator[list[Path]]:
    """Temporary paths for `outputs` (files, or folders holding `marker`: see refuse_existing; all
    in one folder), inside a hidden folder beside them. On success each is renamed onto its output,
    the first one last: outputs[0] is the artifact and its rename the commit, so a writer killed
    in between leaves companions (a report) without an artifact, never an artifact without its
    report. On any error, or after, the hidden folder is removed: nothing half-written stays.
    An OSError writing them (a full disk) is one sentence naming the output, not the temporary."""
    refuse_existing(outputs, force, marker)
    parent = outputs[0].parent
    for up in (parent, *parent.parents):  # say which part of the path is in the way
        if up.exists() or up.is_symlink():
            if not up.is_dir():
                raise EdgetokError(f"cannot write {outputs[0]}: {up} is a file, not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(outputs[0])
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(outputs[0]), dir=parent))
    except OSError as e:
        raise EdgetokError(f"cannot write {outputs[0]}: {e.strerror or e}") from None
    try:
        paths = [tmp / out.name for out in outputs]
        try:
            yield paths
            refuse_existing(outputs, force, marker)  # something may have appeared there meanwhile
            for path, out in reversed(list(zip(paths, outputs))):
                if path.is_dir():
                    os.chmod(path, 0o755)  # whatever the umask: an export is for everyone who reads the folder
                if out.is_dir() and not out.is_symlink():
                    shutil.rmtree(out)
                elif path.is_dir() and out.is_symlink():
                    out.unlink()  # a rename replaces a file by a file (atomically) only
                os.replace(path, out)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT) or str(e.filename or "").startswith(str(tmp)):
                raise EdgetokError(f"could not write {outputs[0]}: {e.strerror or e}") from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_folder(out: Path, force: bool = False, marker: str | None = None) -> Iterator[Path]:
    """An empty temporary folder that becomes `out` on success (see `staged`)."""
    with staged([out], force, marker) as (folder,):
        folder.mkdir()
        yield folder


@contextmanager
def temporary_folder(target: Path) -> Iterator[Path]:
    """A hidden folder beside `target` (stale ones removed first), removed on exit: for writers
    that rename what they built into place themselves."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
