"""Device profiles: the memory, bandwidths and runtime of a device, each number with its source.

The catalog ships as data (profiles.json); `local` is this machine, measured; a user's own device
is a JSON file of the same shape. A profile checks itself: a missing field, an absurd number or
a number without a source is refused in one sentence.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from edgetok.errors import EdgetokError
from edgetok.runtimes.backends.providers import PROVIDERS

if TYPE_CHECKING:
    from edgetok.devices.local import LocalDevice

CATALOG = Path(__file__).with_name("profiles.json")
KINDS = ("cpu", "gpu", "npu")
EXECUTION_PROVIDERS = tuple(PROVIDERS)
# The plausible range of each number: outside it, a profile is a typo (MB for GB, bits for bytes).
RANGES = {
    "device_memory_gb": (0.25, 2048),
    "device_bandwidth_gb_s": (1, 20000),
    "host_memory_gb": (0.25, 4096),
    "host_to_device_gb_s": (0.1, 20000),
    "disk_read_gb_s": (0.005, 100),
}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # where the model runs: cpu | gpu | npu
    execution_provider: str  # ONNX Runtime's, as --provider names it
    device_memory_gb: float  # what the model's weights and its fast KV tier may use
    device_bandwidth_gb_s: float  # reads of that memory: bounds decode
    host_memory_gb: float  # RAM: the KV cache's host tier
    host_to_device_gb_s: float  # host-tier reads (PCIe; unified memory: the memory's own)
    disk_read_gb_s: float  # disk-tier reads, sequential
    sources: dict[str, str]  # each number's public source (or the stated assumption)

    def __post_init__(self) -> None:
        where = f"device profile '{self.name}'"
        if self.kind not in KINDS:
            raise EdgetokError(f"{where}: kind must be one of {', '.join(KINDS)}, not '{self.kind}'")
        if self.execution_provider not in EXECUTION_PROVIDERS:
            raise EdgetokError(f"{where}: execution_provider must be one of {', '.join(EXECUTION_PROVIDERS)}, "
                               f"not '{self.execution_provider}'")
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise EdgetokError(f"{where}: {name} must be a number, not {value!r}")
            if not low <= value <= high:
                raise EdgetokError(f"{where}: {name} = {value} is absurd (a device has {low}–{high}); check the unit")
            if not str(self.sources.get(name, "")).strip():
                raise EdgetokError(f"{where}: {name} has no source; say where the number comes from in sources")
        if self.device_memory_gb > self.host_memory_gb and self.kind != "gpu":
            raise EdgetokError(f"{where}: a {self.kind} device shares the host's memory, so device_memory_gb "
                               f"({self.device_memory_gb}) cannot exceed host_memory_gb ({self.host_memory_gb})")

    @classmethod
    def from_dict(cls, data: object, origin: str) -> DeviceProfile:
        """A profile from JSON, or one sentence about what is wrong with it (origin: where it came from)."""
        if not isinstance(data, dict):
            raise EdgetokError(f"{origin} is not a device profile: expected a JSON object")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise EdgetokError(f"{origin} is missing {', '.join(missing)}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise EdgetokError(f"{origin} has unknown fields {', '.join(unknown)} (a device profile has {', '.join(names)})")
        if not isinstance(data["sources"], dict):
            raise EdgetokError(f"{origin}: sources must be an object mapping each number's field to its source")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def catalog() -> tuple[DeviceProfile, ...]:
    """The shipped profiles."""
    data = json.loads(CATALOG.read_text())
    return tuple(DeviceProfile.from_dict(p, f"{CATALOG.name}[{i}]") for i, p in enumerate(data["profiles"]))


def load_profile(ref: str, kv_dir: Path | None = None) -> DeviceProfile:
    """A profile by name ('local': this machine, measured), or from a JSON file."""
    if ref == "local":
        return local_profile(kv_dir)
    for profile in catalog():
        if profile.name == ref:
            return profile
    path = Path(ref)
    if path.suffix == ".json" or path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EdgetokError(f"{path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EdgetokError(f"{path} is not a readable JSON device profile ({e})") from None
        return DeviceProfile.from_dict(data, str(path))
    names = ", ".join(p.name for p in catalog())
    raise EdgetokError(f"unknown device '{ref}' (choose from local, {names}, or give a profile .json file)")


def local_profile(kv_dir: Path | None = None, probe_mb: int = 64, accelerators: bool = True) -> DeviceProfile:
    """This machine as a profile: the CPU is the device; memory and disk measured (local.detect,
    on a disk probe of probe_mb and memory copies of 4 × that)."""
    from edgetok.devices.local import detect

    return profile_of(detect(kv_dir, max(probe_mb, 1), accelerators))


def profile_of(d: LocalDevice) -> DeviceProfile:
    """A detected machine (its speeds measured) as the profile `local`."""
    gb = 1e9
    measured = "measured on this machine by edgetok.devices.local.detect"
    bandwidth = (d.memory_bandwidth_bytes_per_s or 0) / gb
    return DeviceProfile(
        name="local",
        description=f"this machine: {d.cpu}, {d.logical_cores} cores",
        kind="cpu",
        execution_provider="cpu",
        device_memory_gb=round(d.ram_available_bytes / gb, 2),
        device_bandwidth_gb_s=round(bandwidth, 1),
        host_memory_gb=round(d.ram_total_bytes / gb, 2),
        host_to_device_gb_s=round(bandwidth, 1),
        disk_read_gb_s=round((d.disk_read_bytes_per_s or 0) / gb, 3),
        sources={
            "device_memory_gb": f"RAM available now ({measured})",
            "device_bandwidth_gb_s": f"a large memory copy ({measured})",
            "host_memory_gb": f"RAM total ({measured})",
            "host_to_device_gb_s": "the CPU is the device: the memory's own bandwidth",
            "disk_read_gb_s": f"a sequential read of {d.kv_dir} past the page cache ({measured})",
        },
    )
