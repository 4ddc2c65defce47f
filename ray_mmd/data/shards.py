"""Shard tables: reading a shard's parquet (through the node-local cache when there is one), a bounded
in-memory LRU of the tables being read, and the bounded lookahead that prefetches shards into the cache.

One `ShardTables` belongs to one reader (a stream, a decode worker process): its memory bound and its
open counter are that reader's, not the process's.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_mmd import storage
from ray_mmd.data.cache import ShardCache
from ray_mmd.data.manifest import Manifest, ShardInfo
from ray_mmd.data.order import Chunk

COLS = ["sample_id", "fg_bg", "mask", "depth", "bg_id"]
PREFETCH_AHEAD = 8  # shards fetched ahead of the reader (node-local cache)
TABLE_CAP = 5  # a shuffle window (4 shards) + the next one


class ShardTables:
    """The last `cap` shard tables read, shared by the reader's threads; two threads wanting one shard
    read it once. `opened` counts the shard files actually opened, by URL."""

    def __init__(self, cache: ShardCache | None = None, cap: int = TABLE_CAP) -> None:
        self.cache, self.cap = cache, cap
        self.opened: Counter[str] = Counter()
        self._tables: OrderedDict[str, pa.Table] = OrderedDict()
        self._mu = threading.Lock()
        self._shard_mu: dict[str, threading.Lock] = {}

    @property
    def opens(self) -> int:
        return sum(self.opened.values())

    def read(self, url: str, shard: ShardInfo) -> pa.Table:
        key = f"{url}#{shard.sha256}"
        with self._mu:
            if key in self._tables:
                self._tables.move_to_end(key)
                return self._tables[key]
            mu = self._shard_mu.setdefault(key, threading.Lock())
        with mu:
            with self._mu:
                if key in self._tables:
                    return self._tables[key]
            local = self.cache.get(url, shard) if self.cache is not None else None
            if local is not None:
                table = pq.read_table(local, columns=COLS)
            else:
                fs, path = storage.filesystem(url)
                with fs.open(path, "rb") as f:
                    table = pq.read_table(pa.BufferReader(f.read()), columns=COLS)
            with self._mu:
                self.opened[url] += 1
                self._tables[key] = table
                while len(self._tables) > self.cap:
                    self._tables.popitem(last=False)
        return table

    def clear(self) -> None:
        with self._mu:
            self._tables.clear()


def prefetcher(
    cache: ShardCache | None, man: Manifest, chunks: list[Chunk], ci: int, my_sidx: np.ndarray, n_r: int
) -> Callable[[int], None]:
    """A pump(b) that keeps the shards needed up to batch b plus PREFETCH_AHEAD more in flight, in
    order of first need, then (once this chunk's are all asked for) the next chunk's shards.

    Bounded lookahead: fetching a whole chunk at once would compete with the first batches for
    bandwidth and CPU, making time-to-first-batch grow with the chunk.
    """
    if cache is None:
        return lambda b: None
    uniq, first = np.unique(my_sidx, return_index=True)
    o = np.argsort(first)
    need = [man.shards[int(s)] for s in uniq[o]]
    need_batch = first[o] // max(1, n_r)
    nxt: list[ShardInfo] = []
    if ci + 1 < len(chunks):  # the next chunk, without evicting this one
        c = chunks[ci + 1]
        here = {s.path for s in man.shards_overlapping(chunks[ci].lo, chunks[ci].hi)}
        nxt = [s for s in man.shards_overlapping(c.lo, c.hi) if s.path not in here]
    state = {"sent": 0, "next_sent": not nxt}

    def pump(b: int) -> None:
        target = min(len(need), int(np.searchsorted(need_batch, b, side="right")) + PREFETCH_AHEAD)
        if target > state["sent"]:
            cache.prefetch(
                [(man.url(s.path), s) for s in need[state["sent"] : target]], protect=need[: state["sent"]]
            )
            state["sent"] = target
        if state["sent"] == len(need) and not state["next_sent"]:
            cache.prefetch([(man.url(s.path), s) for s in nxt], protect=need)
            state["next_sent"] = True

    return pump
