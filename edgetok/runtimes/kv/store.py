"""A persistent prompt cache: a prompt's K/V on disk, so a later process skips its prefill.

One file per (model, KV dtype, prompt): a header line of JSON (magic, format version, model
fingerprint, the prompt's tokens and their hash, tensor layout, a CRC-32 per layer and one over the
observation queries) and then the raw K/V of every layer. Files are written to a temporary name and
renamed, under an exclusive lock on the folder; readers take a shared lock. A process killed
mid-write leaves only a temporary file, which lookups ignore and the next save removes. An entry
whose header or checksums do not hold is refused with a message (or, with rebuild, deleted and
recomputed) — never used. (Every byte is checked on every load: the CRCs cost less than reading.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetok.errors import EdgetokError
from edgetok.files import remove_stale, temporary_prefix
from edgetok.runtimes.kv.arrays import numpy_dtype
from edgetok.runtimes.kv.base import KVState

MAGIC = "edgetok-kv-store"
FORMAT_VERSION = 1
SUFFIX = ".kvstore"
DTYPES = ("float32", "bfloat16")  # the K/V dtypes an entry may hold (kv/arrays.py names them)


def token_hash(tokens: list[int]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


@dataclass
class Entry:
    path: Path
    header: dict

    @property
    def tokens(self) -> list[int]:
        return self.header["tokens"]


class PromptStore:
    def __init__(self, folder: Path, fingerprint: str, dtype: np.dtype, rebuild: bool = False) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EdgetokError(f"cannot use {folder} as a KV store: {e.strerror}") from None
        self.fingerprint = fingerprint
        self.dtype = numpy_dtype(dtype)
        self.dtype_name = self.dtype.name
        assert self.dtype_name in DTYPES, self.dtype_name
        self.rebuild = rebuild
        self.prefix = f"{fingerprint[:16]}-{self.dtype_name}-"

    @contextmanager
    def _lock(self, exclusive: bool):
        with open(self.folder / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_header(self, path: Path) -> dict:
        with open(path, "rb") as f:
            line = f.readline(1 << 26)
        try:
            header = json.loads(line)
            assert header["magic"] == MAGIC
        except (ValueError, KeyError, AssertionError, TypeError):
            return self._bad(path, "its header is unreadable")
        if header.get("version") != FORMAT_VERSION:
            return self._bad(path, f"it has format version {header.get('version')}, this edgetok reads {FORMAT_VERSION}")
        if header.get("fingerprint") != self.fingerprint:
            return self._bad(path, "it was written for another model")
        if token_hash(header.get("tokens", [])) != header.get("token_hash"):
            return self._bad(path, "its token list does not match its hash")
        header["_offset"] = len(line)
        return header

    def _bad(self, path: Path, why: str) -> dict:
        if self.rebuild:
            path.unlink(missing_ok=True)
            return {}
        raise EdgetokError(f"the KV store entry {path} cannot be used: {why}; rerun with --kv-store-rebuild to recompute it")

    def lookup(self, prompt: list[int]) -> Entry | None:
        """The stored prompt that shares the longest prefix with `prompt` (at least half of the entry)."""
        best, best_len = None, 0
        with self._lock(exclusive=self.rebuild):
            for path in sorted(self.folder.glob(self.prefix + "*" + SUFFIX)):
                header = self._read_header(path)
                if not header:
                    continue
                n = _common_prefix(header["tokens"], prompt)
                if n > best_len and n * 2 >= len(header["tokens"]):
                    best, best_len = Entry(path, header), n
        return best

    def load(self, entry: Entry, n: int) -> KVState | None:
        """The state of the entry's first n tokens (every layer's K/V, and the stored observation
        queries); None when the entry was damaged and, with rebuild, removed, or when a sliding
        layer's stored window no longer reaches back to what the first n tokens need."""
        header = entry.header
        dtype = numpy_dtype(header["dtype"])
        size = dtype.itemsize
        with self._lock(exclusive=self.rebuild), open(entry.path, "rb") as f:
            f.seek(header["_offset"])
            layers = []
            for i, (shape, crc) in enumerate(zip(header["shapes"], header["crc32"])):
                count = 2 * shape[0] * shape[1] * shape[2]
                data = f.read(count * size)
                if len(data) != count * size or zlib.crc32(data) != crc:
                    self._bad(entry.path, f"layer {i} is truncated or corrupt")
                    return None
                kv = np.frombuffer(bytearray(data), dtype=dtype).reshape(2, *shape)
                layers.append((kv[0], kv[1]))
            q_obs = None
            if header.get("q_obs_shapes"):
                sizes = [0 if shape is None else shape[0] * shape[1] * shape[2] * 4 for shape in header["q_obs_shapes"]]
                data = f.read(sum(sizes))
                crc = header.get("q_obs_crc32")  # (entries from before it have none: their length is checked)
                if len(data) != sum(sizes) or (crc is not None and zlib.crc32(data) != crc):
                    self._bad(entry.path, "its observation queries are truncated or corrupt")
                    return None
                q_obs, pos = [], 0
                for shape, size in zip(header["q_obs_shapes"], sizes):
                    q_obs.append(None if shape is None else
                                 np.frombuffer(bytearray(data[pos : pos + size]), dtype=np.float32).reshape(shape))
                    pos += size
        return KVState(layers, q_obs, header.get("starts"), header.get("windows")).prefix(n)

    def save(self, tokens: list[int], state: KVState) -> Path:
        """Keep a cache's state (cache.state) as the entry of its prompt `tokens`."""
        layers, q_obs = state.layers, state.q_obs
        name = f"{self.prefix}{token_hash(tokens)[:24]}{SUFFIX}"
        blobs = [np.stack([k, v]).astype(self.dtype).tobytes() for k, v in layers]  # (C order)
        queries = b"".join(np.asarray(q, np.float32).tobytes() for q in q_obs or [] if q is not None)
        header = {
            "magic": MAGIC,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype_name,
            "tokens": tokens,
            "token_hash": token_hash(tokens),
            "shapes": [list(k.shape) for k, _ in layers],
            "crc32": [zlib.crc32(b) for b in blobs],
            "q_obs_shapes": [None if q is None else list(q.shape) for q in q_obs] if q_obs else None,
            "q_obs_crc32": zlib.crc32(queries) if q_obs else None,
            "starts": state.starts,  # (sliding layers keep only their window: where each layer's tokens start)
            "windows": state.windows,
        }
        target = self.folder / name
        with self._lock(exclusive=True):
            remove_stale(target)
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target), dir=self.folder)
                with os.fdopen(fd, "wb") as f:
                    f.write(json.dumps(header).encode() + b"\n")
                    for b in blobs:
                        f.write(b)
                    f.write(queries)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException as e:
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)
                if isinstance(e, OSError):
                    raise EdgetokError(f"could not write the KV store entry in {self.folder}: {e.strerror}") from None
                raise
        return target


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
