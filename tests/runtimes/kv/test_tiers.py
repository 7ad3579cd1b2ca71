"""The tier store's memo of what the kernel reads of each chunk (its table row): a row read from
the memo always points into the form the same read returned, as chunks move between the device
tier, host homes and the disk, or leave."""

from __future__ import annotations

import random

import numpy as np
import torch

from edgetok.runtimes.kv import KVConfig
from edgetok.runtimes.kv.codec import kernel_row
from edgetok.runtimes.kv.stats import Counters
from edgetok.runtimes.kv.storage import TieredStorage
from edgetok.runtimes.kv.tiers import AT_DEVICE, AT_DISK, DEVICE, DISK, HOST


def test_memoized_rows_follow_their_chunks_between_tiers(tmp_path):
    hkv, size, d = 2, 8, 16
    chunk_mb = (hkv * size * d * 2 * 2) / (1 << 20)  # a 16-bit chunk's K and V
    cfg = KVConfig(budget="100%", device_mb=3 * chunk_mb, host_mb=5 * chunk_mb, disk_dir=tmp_path)
    storage = TieredStorage(1, hkv, d, torch.float32, Counters(), cfg, bits="auto", reads_forms=True)
    store, rng = storage.store, random.Random(0)
    torch.manual_seed(0)
    keys = []
    where = {DEVICE: 0, HOST: 0, DISK: 0}
    for step in range(60):
        storage.begin_step()
        if step % 3 == 0:  # a new chunk, often hot: colder host homes move to disk
            bits = rng.choice([16, 8, 4])
            keys.append(storage._store_chunk(torch.randn(hkv, size, d), torch.randn(hkv, size, d), bits, heat=rng.random() * 4))
        if step % 17 == 16:  # one leaves
            store.drop(keys.pop(rng.randrange(len(keys))))
        read = np.array(rng.sample(keys, min(len(keys), rng.randint(1, 6))), np.int64)
        at = store.where[read].copy()
        for key in read.tolist():
            where[store.tier_of(key)] += 1
        on_device = {key: store.device[key] for key in read.tolist() if key in store.device}
        home_forms = {key: store.host_form(key) for key in read.tolist() if store.homes[key].tier == HOST}
        rows = storage.fetch_rows(read, None)
        loaded = storage._attending[-1]
        # each row points into the form this read returned: the device tier's, the disk payload loaded, or the host home's
        forms = [on_device[key] if tier == AT_DEVICE else loaded[key] if tier == AT_DISK else home_forms[key]
                 for key, tier in zip(read.tolist(), at.tolist())]
        assert rows.tolist() == [kernel_row(*form) for form in forms]
        # and every remembered row still points into its chunk's form where it is now
        for key in np.flatnonzero(store._row_known).tolist():
            home = store.homes[key]
            form = store.device[key] if store.where[key] == AT_DEVICE else (home.tensors, home.meta)
            assert store.where[key] != AT_DISK and store._rows[key].tolist() == kernel_row(*form)
    assert all(where.values())  # every tier was read from
