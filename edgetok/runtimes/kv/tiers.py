"""Where chunks live: a device cache of float copies over homes in host RAM or in a disk file
(disk.py).

Every chunk has one home — host RAM, or a disk file once the host budget is full — holding its
stored form (compressed or float). The device tier caches copies of the chunks attention reads,
within its byte budget: float copies for a graph's views, or the stored forms themselves for the
mixed-bit attention kernel (which reads chunks at their stored width, so a copy there costs what
the chunk's home does, and a disk chunk is read once). Heat (selections, decayed per step) decides what stays up:
a hot chunk displaces the coldest one above it, a cold one moves down.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgetok.runtimes.kv.codec import Tensors
from edgetok.runtimes.kv.disk import DiskFile

DEVICE, HOST, DISK = "device", "host", "disk"
DECAY = 0.9  # heat kept per step
ADMIT_MARGIN = 1.0  # a chunk displaces a resident only if hotter by this much (no churn between equals)

KV = tuple[torch.Tensor, torch.Tensor]  # float K, V: (Hkv, S, D) each
Form = tuple[Tensors, object]  # a stored form: its tensors and meta (codec.py)


def nbytes(tensors: Tensors) -> int:
    return sum(t.nbytes for t in tensors.values())


@dataclass
class Home:
    tier: str  # HOST | DISK
    size: int  # bytes
    meta: object  # what decompress() needs besides the tensors (bits, shapes)
    tensors: Tensors | None = None  # in host RAM
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)  # on disk
    offset: int = 0


class TierStore:
    def __init__(
        self,
        device_bytes: int | None,
        host_bytes: int | None,
        disk_dir: Path | None,
        decompress: Callable[[list[Form]], list[KV]] | None,
        disk_uncached: bool = False,
        describe: Callable[[Form], object] | None = None,
    ) -> None:
        """decompress: batched, stored forms → float K/V for the device tier; None: the device tier
        caches stored forms (what the mixed-bit attention kernel reads). describe: what a reader
        needs of a stored form (the kernel's table row, pointing into it), kept beside a device
        entry or a host home, from its first read until it leaves: a chunk read at every step is
        not described again (described())."""
        self.budget = {DEVICE: device_bytes, HOST: host_bytes}
        self.used = Counter({DEVICE: 0, HOST: 0, DISK: 0})
        self.decompress = decompress
        self.disk = DiskFile(disk_dir, disk_uncached) if disk_dir is not None else None
        self.homes: dict[int, Home] = {}
        self.device: dict[int, KV | Form] = {}
        self.device_size: dict[int, int] = {}
        self.describe = describe
        self._described = {DEVICE: {}, HOST: {}}  # tier → chunk key → describe()'s answer
        # Heat per chunk key (keys are small increasing ints): value and the step it was last set.
        self._heat_value = np.zeros(1024)
        self._heat_step = np.zeros(1024, dtype=np.int64)
        self.step = 0
        self.lock = threading.RLock()  # placement changes vs the prefetch thread's reads
        self.read_bytes = Counter()  # tier → bytes read, cumulative
        self.read_chunks = Counter()

    # -- heat ------------------------------------------------------------------------------------
    def heats(self, keys) -> np.ndarray:
        k = np.asarray(keys, dtype=np.int64)
        return self._heat_value[k] * DECAY ** (self.step - self._heat_step[k])

    def set_heat(self, key: int, heat: float) -> None:
        if key >= len(self._heat_value):
            grow = max(key + 1, 2 * len(self._heat_value))
            self._heat_value = np.concatenate([self._heat_value, np.zeros(grow - len(self._heat_value))])
            self._heat_step = np.concatenate([self._heat_step, np.zeros(grow - len(self._heat_step), dtype=np.int64)])
        self._heat_value[key], self._heat_step[key] = heat, self.step

    def touch(self, keys: list[int]) -> None:
        if keys:
            k = np.asarray(keys, dtype=np.int64)
            self._heat_value[k] = self.heats(k) + 1.0
            self._heat_step[k] = self.step

    # -- placement -------------------------------------------------------------------------------
    def _room(self, tier: str, size: int) -> bool:
        budget = self.budget[tier]
        return budget is None or self.used[tier] + size <= budget

    def add(self, key: int, tensors: Tensors, meta: object, heat: float = 0.0) -> None:
        """Give a new chunk its home: host RAM if the budget allows (displacing colder homes to disk)."""
        with self.lock:
            self._add(key, tensors, meta, heat)

    def _add(self, key: int, tensors: Tensors, meta: object, heat: float) -> None:
        self.set_heat(key, heat)
        home = Home(HOST, nbytes(tensors), meta, tensors=tensors)
        self.homes[key] = home
        if not self._room(HOST, home.size):
            self._make_room(HOST, home.size, heat)
        self.used[HOST] += home.size
        if not self._room(HOST, 0) and self.disk is not None:
            self._to_disk(key)

    def _to_disk(self, key: int) -> None:
        """A host home moves to the disk file."""
        home = self.homes[key]
        assert home.tier == HOST
        home.offset, home.layout = self.disk.write(home.tensors)
        self.used[HOST] -= home.size
        home.tier, home.tensors = DISK, None
        self._described[HOST].pop(key, None)
        self.used[DISK] += home.size

    def _make_room(self, tier: str, size: int, heat: float) -> None:
        """Move the coldest residents of `tier` down until `size` fits, if they are colder than `heat`."""
        assert tier == HOST
        if self.disk is None:
            return
        residents = [k for k, h in self.homes.items() if h.tier == HOST]
        heats = self.heats(residents)
        for j in np.argsort(heats, kind="stable"):
            if self._room(tier, size) or heats[j] >= heat:
                break
            self._to_disk(residents[j])

    def put_device(self, items: dict[int, KV | Form]) -> None:
        """Offer float copies to the device tier, hottest first; each may displace a colder resident."""
        if not items:
            return
        offers = list(items)
        offer_heat = self.heats(offers)
        residents, resident_heat, r = None, None, 0  # coldest first, computed once per batch
        for j in np.argsort(-offer_heat, kind="stable"):
            key, kv = offers[j], items[offers[j]]
            size = nbytes(kv[0]) if self.decompress is None else kv[0].nbytes + kv[1].nbytes
            if not self._room(DEVICE, size):
                if residents is None:
                    residents = list(self.device)
                    resident_heat = self.heats(residents)
                    order = np.argsort(resident_heat, kind="stable")
                while (r < len(residents) and not self._room(DEVICE, size)
                       and resident_heat[order[r]] + ADMIT_MARGIN < offer_heat[j]):
                    self._evict_device(residents[order[r]])
                    r += 1
                if not self._room(DEVICE, size):
                    break  # the rest are colder still
            kv = _own(kv, self.decompress is None)
            self.device[key] = kv
            self.device_size[key] = size
            self.used[DEVICE] += size

    def _evict_device(self, key: int) -> None:
        del self.device[key]
        self._described[DEVICE].pop(key, None)
        self.used[DEVICE] -= self.device_size.pop(key)

    def described(self, key: int, tier: str, form: Form) -> object:
        """describe(form) for chunk `key`, read as `form` from `tier` (what tier_of() said before
        the read, its placement unchanged since): remembered while the form stays in RAM there."""
        if tier == DISK:  # (a fresh buffer each read)
            return self.describe(form)
        memo = self._described[tier]
        got = memo.get(key)
        if got is None:
            got = memo[key] = self.describe(form)
        return got

    # -- reads -----------------------------------------------------------------------------------
    def decompress_loaded(self, loaded: dict[int, Form]) -> dict[int, KV | Form]:
        """Stored forms → what the device tier holds (themselves, when it holds stored forms)."""
        if self.decompress is None or not loaded:
            return dict(loaded)
        return dict(zip(loaded, self.decompress(list(loaded.values()))))

    def load_homes(self, keys: list[int]) -> dict[int, Form]:
        """The stored forms of `keys`: host tensors as they are, disk payloads read. I/O only, no
        arithmetic, so the prefetch thread calling it does not compete with the model for cores."""
        with self.lock:  # a snapshot: disk offsets never change once written
            homes = [self.homes[k] for k in keys]
            where = [(h.tier, h.tensors, h.offset, h.size, h.layout, h.meta) for h in homes]
        on_disk = [(offset, size, layout) for tier, _, offset, size, layout, _ in where if tier == DISK]
        from_disk = iter(self.disk.read_many(on_disk)) if on_disk else iter(())
        return {k: (tensors if tier == HOST else next(from_disk), meta) for k, (tier, tensors, _, _, _, meta) in zip(keys, where)}

    def account(self, keys: list[int], tiers: list[str]) -> None:
        for key, tier in zip(keys, tiers):
            self.read_bytes[tier] += self.device_size[key] if tier == DEVICE else self.homes[key].size
            self.read_chunks[tier] += 1

    def tier_of(self, key: int) -> str:
        return DEVICE if key in self.device else self.homes[key].tier

    def drop(self, key: int) -> None:
        with self.lock:
            self._drop(key)

    def _drop(self, key: int) -> None:
        if key in self.device:
            self._evict_device(key)
        home = self.homes.pop(key, None)
        if home is not None:
            self.used[home.tier] -= home.size
            self._described[HOST].pop(key, None)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
            self.disk = None


def _own(entry: KV | Form, form: bool) -> KV | Form:
    """A device tier entry that holds only its own chunk: a view into a larger buffer (a batch
    decompressed together, or a run of chunks read from disk at once) would keep all of it alive."""
    tensors = list(entry[0].values()) if form else list(entry)
    if all(t.untyped_storage().nbytes() == t.nbytes for t in tensors):
        return entry
    if form:
        return {name: t.clone() for name, t in entry[0].items()}, entry[1]
    return entry[0].clone(), entry[1].clone()
