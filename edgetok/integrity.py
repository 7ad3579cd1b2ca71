"""Checked integrity: a file edgetok reads back is compared with the SHA-256 recorded when it was
written, cheaply.

A file is hashed on first use; its hash is then kept in a stamp under $EDGETOK_HOME/stamps, keyed
by the file's device and inode and valid while its size and mtime (in ns) hold, so later loads of
a 500 MB export skip the hash. A file rewritten in place gets a new mtime: its stamp no longer
holds and it is hashed again. A file modified less than RACY_NS ago is not stamped (git's "racy"
rule): a second write within the file system's clock tick could keep the same mtime. A rename keeps
the inode and the mtime, so an export's stamps survive its move into place.

Stamps guard against accident (a file overwritten, cut short, bit-flipped), not against someone
who edits both a file and its stamp.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from edgetok.errors import EdgetokError
from edgetok.files import edgetok_home, file_sha256, write_json_atomic

RACY_NS = 2 * 10**9
MIN_RECORDED = 32  # hex digits: a manifest may keep a prefix of a file's SHA-256 (OnnxManifest.graph_sha256)


def _stamp_path(st: os.stat_result) -> Path:
    return edgetok_home() / "stamps" / f"{st.st_dev:x}-{st.st_ino:x}.json"


def sha256(path: Path) -> str:
    """The file's SHA-256 (hex), from its stamp while the stamp holds."""
    st = os.stat(path)  # before hashing: a write during the hash changes the mtime the stamp is checked against
    stamp = _stamp_path(st)
    try:
        data = json.loads(stamp.read_text())
        if data["size"] == st.st_size and data["mtime_ns"] == st.st_mtime_ns and isinstance(data["sha256"], str):
            return data["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no stamp (or an unreadable one): hash
    digest = file_sha256(path)
    if time.time_ns() - st.st_mtime_ns > RACY_NS:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stamp, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
        except OSError:
            pass  # a read-only home: the file is hashed on every load instead
    return digest


def matches(path: Path, recorded: str) -> bool:
    """Whether the file's SHA-256 starts with `recorded` (all of it, or a prefix of ≥ 32 hex digits)."""
    return isinstance(recorded, str) and len(recorded) >= MIN_RECORDED and sha256(path).startswith(recorded.lower())


def check(path: Path, recorded: str, record: Path) -> None:
    """Refuse a file that does not match the hash `record` (its manifest) holds for it."""
    if not matches(path, recorded):
        raise EdgetokError(f"{path} does not match the SHA-256 recorded in {record}: it was changed or damaged "
                           "after export; export it again")
