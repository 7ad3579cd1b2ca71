"""The disk tier: one append-only file of chunk payloads per cache, read in runs of neighbours."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import torch

from edgetok.errors import EdgetokError
from edgetok.runtimes.kv.codec import Layout, Packed


class DiskFile:
    """One append-only file of chunk payloads, unlinked as soon as it is open (POSIX): its space
    returns to the disk when the process closes it or ends, however it ends (kill -9 included), and
    nothing named edgetok-kv-*.bin stays behind. Elsewhere it is deleted when the cache closes.

    uncached: every read goes to the storage device, as it would for a store larger than RAM
    (benchmarks: otherwise the whole file stays in the page cache and a "disk" read is a memcpy).
    Written data is flushed and dropped from the page cache before the next read, each read range
    is dropped after it is read, and read-ahead is off. Linux/POSIX only (posix_fadvise)."""

    def __init__(self, folder: Path, uncached: bool = False) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f"edgetok-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise EdgetokError(f"cannot use {folder} for the KV disk tier: {e.strerror}") from None
        if os.name == "posix":
            self.path.unlink()
        self.end = 0
        self.uncached = uncached
        if uncached and not hasattr(os, "posix_fadvise"):
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
            raise EdgetokError("--kv-disk-uncached needs posix_fadvise (Linux); drop the flag on this system")
        if uncached:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead into the page cache
        self._dirty = False  # written since the last flush (dirty pages cannot be dropped)

    def write(self, tensors: Packed) -> int:
        """Append a packed form: → its offset in the file."""
        data = tensors.buffer.numpy()
        try:
            written = os.pwrite(self.fd, data, self.end)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise EdgetokError(f"the KV disk tier is full ({self.path.parent}); free space or raise --kv-host-mb") from None
            raise EdgetokError(f"the KV disk tier could not write to {self.path.parent}: {e.strerror}") from None
        if written != data.nbytes:  # a full disk may take part of a write before ENOSPC
            raise EdgetokError(f"the KV disk tier took {written} of {data.nbytes} bytes ({self.path}): the disk is full "
                               "or failing; free space or raise --kv-host-mb")
        self._dirty = True
        offset, self.end = self.end, self.end + data.nbytes
        return offset

    def read_many(self, items: list[tuple[int, Layout]]) -> list[Packed]:
        """Packed forms at (offset, layout), in order; neighbours on disk are read in one call, into
        one buffer their forms view."""
        order = sorted(range(len(items)), key=lambda i: items[i][0])
        out: list = [None] * len(items)
        run: list[int] = []
        if self.uncached and self._dirty:
            self._dirty = False  # before the flush: a write racing with it marks the file again
            os.fdatasync(self.fd)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for i in order + [None]:
            if run and (i is None or items[i][0] != items[run[-1]][0] + items[run[-1]][1].size):
                start = items[run[0]][0]
                buf = torch.empty(items[run[-1]][0] + items[run[-1]][1].size - start, dtype=torch.uint8)
                got = os.preadv(self.fd, [buf.numpy()], start)
                if got != buf.numel():
                    raise EdgetokError(f"the KV disk tier read {got} of {buf.numel()} bytes at offset {start} of {self.path}: "
                                       "was the file truncated?")
                if self.uncached:
                    os.posix_fadvise(self.fd, start, buf.numel(), os.POSIX_FADV_DONTNEED)
                for j in run:
                    at, layout = items[j][0] - start, items[j][1]
                    out[j] = Packed(buf[at : at + layout.size], layout)
                run = []
            if i is not None:
                run.append(i)
        return out

    def close(self) -> None:
        os.close(self.fd)
        if os.name != "posix":
            self.path.unlink(missing_ok=True)
