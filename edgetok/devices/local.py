"""This machine: cores and ISA features, memory, the KV directory's disk, the runtimes' accelerators.

Everything is read from the OS (psutil, /proc/cpuinfo) or asked of the runtimes, except the disk's
sequential read speed, which is measured: a file of `probe_mb` is written into the KV directory,
dropped from the page cache, and read back (a number from a spec sheet says nothing about the
filesystem the cache will really use).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from edgetok.errors import EdgetokError
from edgetok.kernels import ort_ops

# The instruction-set features edgetok's kernels and its runtimes' kernels care about.
ISA_FEATURES = ("sse4_2", "fma", "f16c", "avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                "asimd", "asimddp", "sve", "i8mm")
PROBE_BLOCK = 1 << 20


@dataclass(frozen=True)
class LocalDevice:
    cpu: str
    physical_cores: int
    logical_cores: int
    isa: tuple[str, ...]  # of ISA_FEATURES, those the CPU reports
    ram_total_bytes: int
    ram_available_bytes: int
    kv_dir: str
    disk_free_bytes: int
    disk_read_bytes_per_s: float | None  # measured; None when not measured (probe_mb=0)
    memory_bandwidth_bytes_per_s: float | None  # measured (a large copy: bytes read + written per second)
    onnxruntime_providers: tuple[str, ...]
    torch_accelerators: tuple[str, ...]
    edgetok_kernels: str | None  # the loops edgetok's compiled ONNX Runtime operators run here (None: not built)
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why

    def to_dict(self) -> dict:
        return asdict(self)


def detect(kv_dir: Path | None = None, probe_mb: int = 64, accelerators: bool = True) -> LocalDevice:
    """This machine, with the sequential read speed of `kv_dir` (default: the temp dir) measured
    on a file of probe_mb, and the memory bandwidth on arrays of 4 × probe_mb (0: neither measured).
    accelerators=False: torch is not asked for its accelerators (asking imports it: ~190 MB)."""
    if probe_mb < 0:
        raise EdgetokError(f"the disk probe size must be ≥ 0 MB, not {probe_mb}")
    kv = Path(kv_dir) if kv_dir is not None else Path(tempfile.gettempdir())
    if not kv.is_dir():
        raise EdgetokError(f"{kv} is not a folder; give the folder the KV disk tier will use")
    notes: list[str] = []
    speed = None
    if probe_mb:
        try:
            speed = disk_read_speed(kv, probe_mb)
        except OSError as e:
            notes.append(f"the disk read speed of {kv} was not measured: {e.strerror or e}")
    memory = psutil.virtual_memory()
    return LocalDevice(
        cpu=_cpu_name(),
        physical_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        logical_cores=psutil.cpu_count() or 1,
        isa=_isa_features(),
        ram_total_bytes=memory.total,
        ram_available_bytes=memory.available,
        kv_dir=str(kv),
        disk_free_bytes=shutil.disk_usage(kv).free,
        disk_read_bytes_per_s=speed,
        memory_bandwidth_bytes_per_s=memory_bandwidth(4 * probe_mb) if probe_mb else None,
        onnxruntime_providers=_onnxruntime_providers(),
        torch_accelerators=_torch_accelerators() if accelerators else (),
        edgetok_kernels=ort_ops.isa(),
        notes=notes,
    )


def disk_read_speed(folder: Path, probe_mb: int) -> float:
    """Bytes per second of a sequential read of a new probe_mb file in `folder`, past the page
    cache where the OS allows it (posix_fadvise); the file is removed — on POSIX as soon as it is
    open, so that a process killed mid-measure leaves no probe behind (as runtimes/kv/disk.py)."""
    data = os.urandom(PROBE_BLOCK)  # incompressible, so a compressing filesystem cannot flatter it
    fd, name = tempfile.mkstemp(prefix=".edgetok-probe-", dir=folder)
    if os.name == "posix":
        os.unlink(name)
    try:
        for _ in range(probe_mb):
            os.write(fd, data)
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.lseek(fd, 0, os.SEEK_SET)
        start = time.perf_counter()
        read = 0
        while chunk := os.read(fd, 8 * PROBE_BLOCK):
            read += len(chunk)
        return read / max(time.perf_counter() - start, 1e-9)
    finally:
        os.close(fd)
        if os.name != "posix":
            os.unlink(name)


def memory_bandwidth(mb: int, rounds: int = 3) -> float:
    """Bytes per second a large copy moves (each byte read once and written once), best of `rounds`:
    what bounds decode, which reads every weight and the KV cache it attends to once per token."""
    import numpy as np

    src = np.ones(mb << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # the pages are touched before timing
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / max(best, 1e-9)


def _cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith(("model name", "Model")):  # x86 | Arm boards
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _isa_features() -> tuple[str, ...]:
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return tuple(f for f in ISA_FEATURES if f in flags)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def _onnxruntime_providers() -> tuple[str, ...]:
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())


def _torch_accelerators() -> tuple[str, ...]:
    """What torch can run on besides the CPU; torch is not imported where it is not installed
    (the runtime does not need it)."""
    if importlib.util.find_spec("torch") is None:
        return ()
    import torch

    found = []
    if torch.cuda.is_available():
        found += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        found.append("xpu")
    return tuple(found)
