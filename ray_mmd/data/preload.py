"""Decoded preload: a chunk's decoded, stage-size samples kept in memory so later epochs skip the decode.

Two stores with one interface (`fill` what is there, `put` what was just decoded):

* `LocalDecoded`: numpy arrays in this process. Right for one rank per process and no Ray.
* `SharedDecoded`: the samples live in the Ray object store (one object per decoded unit, put by the
  rank that decoded it) and a small registry actor maps sample id -> (object, row). Every rank of the
  run, on any node, is served from it: with W ranks a rank's next-epoch ids were mostly decoded by
  other ranks, so a per-process store would hit only ~1/W of them. An object lost with its owner (a
  rank died) is simply decoded again.

Both are optimisations only: a row that cannot be served is decoded, so exactly-once never depends on
them. One chunk is kept at a time.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

import numpy as np

from ray_mmd.data.transforms import KEYS, alloc_wire

log = logging.getLogger(__name__)


def nbytes(n: int, size: int) -> int:
    """Bytes of n decoded samples at size×size: fg_bg 3 + mask 1 + depth 1 channels, + bg id."""
    return n * (5 * size * size + 8)


class LocalDecoded:
    """Decoded uint8 samples of one chunk in wire layout, in this process (filled in any rank order)."""

    def __init__(self, ids: np.ndarray, shapes: dict[str, tuple[int, int]]) -> None:
        self.ids = ids
        self.arr = {k: v.numpy() for k, v in alloc_wire(len(ids), shapes).items()}
        self.bg_id = np.zeros(len(ids), np.int64)
        self.have = np.zeros(len(ids), bool)

    def _index(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, ids)

    def begin_epoch(self, expect_hits: bool) -> None:
        pass

    def has(self, ids: np.ndarray) -> np.ndarray:
        return self.have[self._index(ids)]

    def fill(
        self, ids: np.ndarray, view: dict[str, np.ndarray], where: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Copy the stored samples among `ids` into rows `where` of `view`: (which were filled, bg ids)."""
        idx = self._index(ids)
        got = self.have[idx]
        if got.any():
            for k in KEYS:
                view[k][where[got]] = self.arr[k][idx[got]]
        return got, self.bg_id[idx]

    def put(self, ids: np.ndarray, rows: dict[str, np.ndarray], bg_id: np.ndarray) -> None:
        idx = self._index(ids)
        for k in KEYS:
            self.arr[k][idx] = rows[k]
        self.bg_id[idx] = bg_id
        self.have[idx] = True


class _Registry:
    """Ray actor: sample id -> (object ref, row) for one chunk's decoded units."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self.block = np.full(len(ids), -1, np.int32)
        self.row = np.zeros(len(ids), np.int32)
        self.refs: list = []

    def add(self, ids: np.ndarray, ref_box: list) -> None:
        idx = np.searchsorted(self.ids, ids)
        self.block[idx] = len(self.refs)
        self.row[idx] = np.arange(len(ids), dtype=np.int32)
        self.refs.append(ref_box[0])  # boxed so Ray passes the ref, not the object

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, list]:
        return self.block, self.row, list(self.refs)


class SharedDecoded:
    """Decoded samples of one chunk in the Ray object store, shared by all ranks (see module doc).

    Each rank keeps a snapshot of the registry's map (refreshed at most every REFRESH_S while ids are
    missing) and the objects it has fetched (zero-copy views of the node's object store), so serving a
    unit costs row copies, not Ray calls.
    """

    REFRESH_S = 1.0

    def __init__(self, key: tuple, ids: np.ndarray) -> None:
        import ray

        self._ray = ray
        self.ids = ids
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
        # the first rank to get here creates it; the actor lives as long as that rank's process
        self.registry = (
            ray.remote(num_cpus=0)(_Registry)
            .options(name=f"ray_mmd_decoded_{digest}", namespace="ray_mmd", get_if_exists=True)
            .remote(ids)
        )
        self._mu = threading.Lock()
        self._snap: tuple[np.ndarray, np.ndarray, list] | None = None
        self._snap_t = -np.inf
        self._blocks: dict[int, dict | None] = {}
        self._lookups = True

    def _map(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
        """(block, row, refs) of chunk positions idx, from a snapshot refreshed if ids are missing."""
        with self._mu:
            stale = self._lookups and (self._snap is None or (self._snap[0][idx] < 0).any())
            if stale and time.monotonic() - self._snap_t >= self.REFRESH_S:
                self._snap_t = time.monotonic()
                try:
                    self._snap = self._ray.get(self.registry.snapshot.remote())
                except Exception as e:  # registry gone (its rank died): nothing is stored any more
                    log.warning("decoded preload registry unavailable (%s); decoding again", type(e).__name__)
            if self._snap is None:
                return np.full(len(idx), -1, np.int32), np.zeros(len(idx), np.int32), []
            block, row, refs = self._snap
            return block[idx], row[idx], refs

    def _block(self, b: int, refs: list) -> dict | None:
        with self._mu:
            if b not in self._blocks:
                try:
                    self._blocks[b] = self._ray.get(refs[b])
                except Exception:  # lost with the rank that put it: its rows are decoded again
                    self._blocks[b] = None
            return self._blocks[b]

    def begin_epoch(self, expect_hits: bool) -> None:
        """A new epoch: refresh the map now (other ranks added samples), or, in a chunk's first epoch,
        do no lookups at all (nothing is stored yet; the registry may still be starting)."""
        self._lookups = expect_hits
        self._snap_t = -np.inf

    def has(self, ids: np.ndarray) -> np.ndarray:
        return self._map(np.searchsorted(self.ids, ids))[0] >= 0

    def fill(
        self, ids: np.ndarray, view: dict[str, np.ndarray], where: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        got = np.zeros(len(ids), bool)
        bg_id = np.zeros(len(ids), np.int64)
        blk, rows, refs = self._map(np.searchsorted(self.ids, ids))
        for b in np.unique(blk[blk >= 0]):
            block = self._block(int(b), refs)
            if block is None:
                continue
            pos = np.nonzero(blk == b)[0]
            for k in KEYS:
                view[k][where[pos]] = block[k][rows[pos]]
            bg_id[pos] = block["bg_id"][rows[pos]]
            got[pos] = True
        return got, bg_id

    def put(self, ids: np.ndarray, rows: dict[str, np.ndarray], bg_id: np.ndarray) -> None:
        block = {k: np.ascontiguousarray(rows[k]) for k in KEYS}
        block["bg_id"] = np.asarray(bg_id, np.int64)
        try:
            self.registry.add.remote(np.asarray(ids), [self._ray.put(block)])
        except Exception as e:
            log.warning("decoded preload registry unavailable (%s)", type(e).__name__)

    def close(self) -> None:
        """Drop the chunk (its objects are freed once no rank holds them)."""
        self._blocks.clear()
        self._snap = None
        try:
            self._ray.kill(self.registry)
        except Exception:
            pass
