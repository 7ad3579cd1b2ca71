"""Where chunks live: a device cache of float copies over homes in host RAM or in a disk file
(disk.py).

Every chunk has one home — host RAM, or a disk file once the host budget is full — holding its
stored form (compressed or float). The device tier caches copies of the chunks attention reads,
within its byte budget: float copies for a graph's views, or the stored forms themselves for the
mixed-bit attention kernel (which reads chunks at their stored width, so a copy there costs what
the chunk's home does, and a disk chunk is read once). Heat (selections, decayed per step) decides what stays up:
a hot chunk displaces the coldest one above it, a cold one moves down.

What a decode step asks of every chunk it reads (where it is, what reading it costs, its kernel
row, its heat) is kept in arrays indexed by the chunk's key (keys are small increasing ints), so
a step's few hundred reads are looked up in one numpy operation each, not one Python call each.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetok.kernels import mixed_attention
from edgetok.runtimes.kv.codec import Layout, Packed
from edgetok.runtimes.kv.disk import DiskFile

DEVICE, HOST, DISK = "device", "host", "disk"
TIERS = (DEVICE, HOST, DISK)  # TierStore.where's codes are indices into it
AT_DEVICE, AT_HOST, AT_DISK, NOWHERE = 0, 1, 2, -1
ROW = len(mixed_attention.FIELDS)  # a kernel table row's fields
DECAY = 0.9  # heat kept per step
ADMIT_MARGIN = 1.0  # a chunk displaces a resident only if hotter by this much (no churn between equals)

KV = tuple[torch.Tensor, torch.Tensor]  # float K, V: (Hkv, S, D) each
Form = tuple[Packed, object]  # a stored form: its tensors and meta (codec.py)


@dataclass
class Home:
    tier: str  # HOST | DISK
    size: int  # bytes
    meta: object  # what decompress() needs besides the tensors (bits, shapes)
    tensors: Packed | None = None  # in host RAM
    layout: Layout | None = None  # on disk
    offset: int = 0


class TierStore:
    def __init__(
        self,
        device_bytes: int | None,
        host_bytes: int | None,
        disk_dir: Path | None,
        decompress: Callable[[list[Form]], list[KV]] | None,
        disk_uncached: bool = False,
        describe: Callable[[Form], list[int]] | None = None,
    ) -> None:
        """decompress: batched, stored forms → float K/V for the device tier; None: the device tier
        caches stored forms (what the mixed-bit attention kernel reads). describe: a stored form's
        kernel table row (pointing into it), remembered while the form stays where it was read
        (rows()): a chunk read at every step is not described again."""
        self.budget = {DEVICE: device_bytes, HOST: host_bytes}
        self.used = Counter({DEVICE: 0, HOST: 0, DISK: 0})
        self.decompress = decompress
        self.disk = DiskFile(disk_dir, disk_uncached) if disk_dir is not None else None
        self.homes: dict[int, Home] = {}
        self.device: dict[int, KV | Form] = {}
        self.device_size: dict[int, int] = {}
        self.describe = describe
        # Per chunk key: the tier a read finds it in (AT_*), the bytes that read costs, its kernel
        # row while known, its heat (the value and the step it was last set).
        self.where = np.full(1024, NOWHERE, np.int8)
        self.read_size = np.zeros(1024, np.int64)
        self._rows = np.zeros((1024, ROW), np.int64)
        self._row_known = np.zeros(1024, bool)
        self._heat_value = np.zeros(1024)
        self._heat_step = np.zeros(1024, dtype=np.int64)
        # While a step's table points into forms (hold()), those that leave RAM (evicted, moved
        # to disk, dropped) are kept until release().
        self._released: list | None = None
        self.step = 0
        self.lock = threading.RLock()  # placement changes vs the prefetch thread's reads
        self.read_bytes = Counter()  # tier → bytes read, cumulative
        self.read_chunks = Counter()

    def _grow(self, key: int) -> None:
        """Room in the per-key arrays for `key`."""
        n = len(self.where)
        if key < n:
            return
        grow = max(key + 1, 2 * n) - n
        self.where = np.concatenate([self.where, np.full(grow, NOWHERE, np.int8)])
        self.read_size = np.concatenate([self.read_size, np.zeros(grow, np.int64)])
        self._rows = np.concatenate([self._rows, np.zeros((grow, ROW), np.int64)])
        self._row_known = np.concatenate([self._row_known, np.zeros(grow, bool)])
        self._heat_value = np.concatenate([self._heat_value, np.zeros(grow)])
        self._heat_step = np.concatenate([self._heat_step, np.zeros(grow, np.int64)])

    def _place(self, key: int, at: int, size: int) -> None:
        """Chunk `key` is now read from tier `at` (AT_*) at `size` bytes: its remembered row, if
        any, pointed at the form it had before."""
        self.where[key], self.read_size[key], self._row_known[key] = at, size, False

    def hold(self) -> None:
        """Kernel rows are being taken: keep every form that leaves RAM until release()."""
        if self._released is None:
            self._released = []

    def release(self) -> None:
        """The rows taken since hold() are no longer read: the forms that left RAM may go."""
        self._released = None

    def _let_go(self, form: object) -> None:
        if self._released is not None and form is not None:
            self._released.append(form)

    # -- heat ------------------------------------------------------------------------------------
    def heats(self, keys) -> np.ndarray:
        k = np.asarray(keys, dtype=np.int64)
        return self._heat_value[k] * DECAY ** (self.step - self._heat_step[k])

    def set_heat(self, key: int, heat: float) -> None:
        self._grow(key)
        self._heat_value[key], self._heat_step[key] = heat, self.step

    def touch(self, keys: np.ndarray) -> None:
        if len(keys):
            k = np.asarray(keys, dtype=np.int64)
            self._heat_value[k] = self.heats(k) + 1.0
            self._heat_step[k] = self.step

    # -- placement -------------------------------------------------------------------------------
    def _room(self, tier: str, size: int) -> bool:
        budget = self.budget[tier]
        return budget is None or self.used[tier] + size <= budget

    def add(self, key: int, tensors: Packed, meta: object, heat: float = 0.0) -> None:
        """Give a new chunk its home: host RAM if the budget allows (displacing colder homes to disk)."""
        with self.lock:
            self._add(key, tensors, meta, heat)

    def _add(self, key: int, tensors: Packed, meta: object, heat: float) -> None:
        self.set_heat(key, heat)
        home = Home(HOST, tensors.nbytes, meta, tensors=tensors)
        self.homes[key] = home
        self._place(key, AT_HOST, home.size)
        if not self._room(HOST, home.size):
            self._make_room(HOST, home.size, heat)
        self.used[HOST] += home.size
        if not self._room(HOST, 0) and self.disk is not None:
            self._to_disk(key)

    def _to_disk(self, key: int) -> None:
        """A host home moves to the disk file."""
        home = self.homes[key]
        assert home.tier == HOST
        home.offset, home.layout = self.disk.write(home.tensors), home.tensors.layout
        self.used[HOST] -= home.size
        self._let_go(home.tensors)
        home.tier, home.tensors = DISK, None
        if key not in self.device:
            self._place(key, AT_DISK, home.size)
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

    def put_device(self, offers: list[int], entry: Callable[[int], KV | Form]) -> None:
        """Offer chunks to the device tier, hottest first; each may displace a colder resident.
        entry(key): what the tier would hold of it (asked only of the chunks considered)."""
        if not offers:
            return
        offer_heat = self.heats(offers)
        residents, resident_heat, r = None, None, 0  # coldest first, computed once per batch
        for j in np.argsort(-offer_heat, kind="stable"):
            key = offers[j]
            kv = entry(key)
            size = kv[0].nbytes if self.decompress is None else kv[0].nbytes + kv[1].nbytes
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
            self._place(key, AT_DEVICE, size)
            self.used[DEVICE] += size

    def _evict_device(self, key: int) -> None:
        self._let_go(self.device.pop(key))
        self.used[DEVICE] -= self.device_size.pop(key)
        home = self.homes.get(key)
        if home is not None:
            self._place(key, TIERS.index(home.tier), home.size)

    def rows(self, keys: np.ndarray, at: np.ndarray, form: Callable[[int, int], Form]) -> np.ndarray:
        """The kernel rows (len(keys), ROW) of chunks `keys`, read from tiers `at` (where[keys]
        before the read; placement unchanged since) as form(key, tier) has them. Rows of forms
        that stay in RAM are remembered until the chunk moves."""
        out = self._rows[keys]
        for j in np.flatnonzero(~self._row_known[keys]).tolist():
            key, tier = int(keys[j]), int(at[j])
            out[j] = row = self.describe(form(key, tier))
            if tier != AT_DISK:  # (a disk read is a fresh buffer each time)
                self._rows[key], self._row_known[key] = row, True
        return out

    # -- reads -----------------------------------------------------------------------------------
    def decompress_loaded(self, loaded: dict[int, Form]) -> dict[int, KV | Form]:
        """Stored forms → what the device tier holds (themselves, when it holds stored forms)."""
        if self.decompress is None or not loaded:
            return dict(loaded)
        return dict(zip(loaded, self.decompress(list(loaded.values()))))

    def host_form(self, key: int) -> Form:
        """Chunk `key`'s stored form in its host home."""
        home = self.homes[key]
        return home.tensors, home.meta

    def load_homes(self, keys: list[int]) -> dict[int, Form]:
        """The stored forms of `keys`: host tensors as they are, disk payloads read. I/O only, no
        arithmetic (the prefetch thread calls it too; a page-cache read is still CPU work:
        prefetch.py)."""
        with self.lock:  # a snapshot: disk offsets never change once written
            homes = [self.homes[k] for k in keys]
            where = [(h.tier, h.tensors, h.offset, h.size, h.layout, h.meta) for h in homes]
        on_disk = [(offset, layout) for tier, _, offset, _, layout, _ in where if tier == DISK]
        from_disk = iter(self.disk.read_many(on_disk)) if on_disk else iter(())
        return {k: (tensors if tier == HOST else next(from_disk), meta) for k, (tier, tensors, _, _, _, meta) in zip(keys, where)}

    def account(self, keys: np.ndarray, at: np.ndarray) -> None:
        """Count reads of `keys` from tiers `at` (where[keys] before the read)."""
        counts = np.bincount(at, minlength=3)
        sizes = np.bincount(at, weights=self.read_size[keys], minlength=3)
        for tier, n, size in zip(TIERS, counts.tolist(), sizes.tolist()):
            if n:
                self.read_bytes[tier] += int(size)
                self.read_chunks[tier] += n

    def tier_of(self, key: int) -> str:
        return TIERS[self.where[key]]

    def drop(self, key: int) -> None:
        with self.lock:
            self._drop(key)

    def _drop(self, key: int) -> None:
        if key in self.device:
            self._evict_device(key)
        home = self.homes.pop(key, None)
        if home is not None:
            self.used[home.tier] -= home.size
            self._let_go(home.tensors)
        self._place(key, NOWHERE, 0)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
            self.disk = None


def _own(entry: KV | Form, form: bool) -> KV | Form:
    """A device tier entry that holds only its own chunk: a view into a larger buffer (a batch
    decompressed together, or a run of chunks read from disk at once) would keep all of it alive."""
    if form:
        return entry[0].owned(), entry[1]
    if all(t.untyped_storage().nbytes() == t.nbytes for t in entry):
        return entry
    return entry[0].clone(), entry[1].clone()
