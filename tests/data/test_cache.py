"""Selective preload cache: byte budget, LRU eviction, sha256 re-fetch, next-chunk prefetch, shared dir."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time

import pytest

from ray_mmd.data import manifest as mf
from ray_mmd.data.cache import ShardCache
from ray_mmd.data.order import Chunk
from ray_mmd.data.stream import DataStream
from ray_mmd.errors import UserError


@pytest.fixture(scope="module")
def packed(packed_factory) -> str:
    return packed_factory(160, 20, seed=3)


def _disk_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if not f.startswith("."))


def test_budget_never_exceeded_with_concurrent_users(packed_gs, tmp_path):
    man = mf.load(packed_gs)
    budget = int(max(s.bytes for s in man.shards) * 2.5)
    d = str(tmp_path / "cache")
    caches = [ShardCache(d, budget, threads=3) for _ in range(2)]  # two "workers" sharing one node dir
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], sum(e[1] for e in caches[0]._entries()))
            time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    try:
        items = [(man.url(s.path), s) for s in man.shards]
        caches[1].prefetch(items[::-1])
        for url, s in items:
            p = caches[0].get(url, s)
            assert p is None or open(p, "rb").read(4) == b"PAR1"
    finally:
        stop.set()
        t.join()
        for c in caches:
            c.close()
    assert 0 < peak[0] <= budget and _disk_bytes(d) <= budget
    assert caches[0].counters["evictions"] + caches[1].counters["evictions"] > 0


def test_lru_eviction_order(packed, tmp_path):
    man = mf.load(packed)
    budget = sum(s.bytes for s in man.shards[:3])
    c = ShardCache(str(tmp_path / "c"), budget)
    a, b, x, y = man.shards[:4]
    for s in (a, b, x):
        c.get(man.url(s.path), s)
        time.sleep(0.01)
    c.get(man.url(a.path), a)  # a is now the most recently used
    c.get(man.url(y.path), y)
    assert c.contains(a) and not c.contains(b) and c.contains(x) and c.contains(y)
    assert c.counters == {**c.counters, "hits": 1, "misses": 4, "evictions": 1}


def test_corrupt_cached_file_refetched(packed, tmp_path):
    man = mf.load(packed)
    s = man.shards[0]
    c = ShardCache(str(tmp_path / "c"), 1 << 30)
    p = c.get(man.url(s.path), s)
    with open(p, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\x00\xff")
    p2 = c.get(man.url(s.path), s)
    assert p2 == p and c.counters["refetches"] == 1
    assert hashlib.sha256(open(p, "rb").read()).hexdigest() == s.sha256


def test_corrupt_source_names_url(packed, tmp_path):
    root = str(tmp_path / "ds")
    shutil.copytree(packed, root)
    man = mf.load(root)
    s = man.shards[1]
    with open(os.path.join(root, s.path), "r+b") as f:
        f.seek(50)
        f.write(b"\x00\x01\x02")
    c = ShardCache(str(tmp_path / "c"), 1 << 30)
    with pytest.raises(UserError, match=s.path.replace(".", r"\.")):
        c.get(man.url(s.path), s)
    assert not os.listdir(c.dir) or all(f.startswith(".") for f in os.listdir(c.dir))  # nothing half-kept


def test_shard_larger_than_budget_is_a_user_error(packed, tmp_path):
    man = mf.load(packed)
    c = ShardCache(str(tmp_path / "c"), 10)
    with pytest.raises(UserError, match="cache_bytes"):
        c.get(man.url(man.shards[0].path), man.shards[0])


def test_next_chunk_cached_before_stream_reaches_it(packed_gs, tmp_path, stream_cfg):
    man = mf.load(packed_gs)
    cfg = stream_cfg(
        packed_gs,
        chunks=[Chunk(0, 80, 1), Chunk(80, 160, 1)],
        image_size=32,
        global_batch_size=8,
        cache_dir=str(tmp_path / "c"),
        cache_bytes=sum(s.bytes for s in man.shards) + 1,
        workers=2,
    )
    s = DataStream(cfg)
    g = s.epoch_batches()
    next(g)  # chunk 0 has started; chunk 1 is being prefetched in the background
    nxt = man.shards_overlapping(80, 160)
    deadline = time.monotonic() + 60
    while not all(s.cache.contains(x) for x in nxt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(s.cache.contains(x) for x in nxt)
    list(g)
    misses = s.cache.counters["misses"]
    assert s.position == (1, 0, 0)
    ids = [int(i) for b in s.epoch_batches() for i in b["sample_id"]]
    assert ids and all(80 <= i < 160 for i in ids)
    assert s.cache.counters["misses"] == misses  # chunk 1 was served from the cache only
    assert s.stats()["cache_prefetched"] >= len(nxt)
