"""The tier store's memo of what the kernel reads of each chunk (its table row): a row read from
the memo always points into the form the same read returned, as chunks move between the device
tier, host homes and the disk, or leave."""

from __future__ import annotations

import random

import torch

from edgetok.runtimes.kv import KVConfig
from edgetok.runtimes.kv.codec import kernel_row
from edgetok.runtimes.kv.stats import Counters
from edgetok.runtimes.kv.storage import TieredStorage
from edgetok.runtimes.kv.tiers import DEVICE, DISK, HOST


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
        read = rng.sample(keys, min(len(keys), rng.randint(1, 6)))
        for key in read:
            where[store.tier_of(key)] += 1
        got, rows = storage._fetch(read, None)
        assert rows == [kernel_row(*form) for form in got]  # each row points into the form this read returned
        storage._attending.append(got)
    assert all(where.values())  # every tier was read from
    memo = store._described
    assert set(memo[DEVICE]) <= set(store.device) and set(memo[HOST]) <= {k for k, h in store.homes.items() if h.tier == HOST}
