"""Shard tables: a bounded LRU owned by its reader, one read per shard under concurrency, per-reader
open counts; a resumed stream never opens the shards it has consumed."""

from __future__ import annotations

import threading

from ray_mmd.data import manifest as mf
from ray_mmd.data.order import Chunk
from ray_mmd.data.shards import ShardTables
from ray_mmd.data.stream import DataStream


def test_tables_bounded_and_read_once(packed):
    man = mf.load(packed)
    t = ShardTables(cap=2)
    a, b, c = man.shards[:3]
    barrier = threading.Barrier(4)

    def read() -> None:
        barrier.wait()
        t.read(man.url(a.path), a)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.opens == 1  # four threads wanted shard a at once: it was read once
    ta = t.read(man.url(a.path), a)
    assert ta.column("sample_id").to_pylist()[0] == a.first_id
    t.read(man.url(b.path), b)
    t.read(man.url(c.path), c)  # over the bound: a (least recently used) goes
    t.read(man.url(a.path), a)
    assert t.opened[man.url(a.path)] == 2 and t.opens == 4
    other = ShardTables()  # another reader's counter and tables are its own
    assert other.opens == 0


def test_resume_skips_consumed_shards(packed, stream_cfg):
    cfg = stream_cfg(
        packed, shuffle=False, global_batch_size=10, chunks=[Chunk(0, 240, 1)], image_size=32, workers=2
    )
    s = DataStream(cfg)
    g = s.epoch_batches()
    for _ in range(int(0.7 * s.steps_in_epoch())):
        last = next(g)
    g.close()
    state = s.state_dict()
    consumed_max = int(last["sample_id"].max())
    r = DataStream(cfg)
    r.load_state_dict(state)
    rest = [int(i) for b in r.epoch_batches() for i in b["sample_id"]]
    assert min(rest) > consumed_max
    man = mf.load(packed)
    opened = {u.rsplit("/", 1)[-1] for u in r.tables.opened}
    consumed_shards = {s_.path.rsplit("/", 1)[-1] for s_ in man.shards if s_.last_id < min(rest)}
    assert consumed_shards and not opened & consumed_shards
    assert r.stats()["shards_opened"] == len(opened) <= len(man.shards) - len(consumed_shards)
