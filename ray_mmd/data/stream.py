"""The training input stream: chunk schedule, seeded epoch order, per-rank batches, exactly-once resume.

Order. For (chunk c, epoch e) the order is a seeded permutation of the chunk's split ids that depends on
nothing else (not on world size, rank or batch size): shards are shuffled, grouped `shuffle_window` at a
time, and the rows of each group shuffled. Global batch k is positions [consumed0 + k·G, … + G) of that
order; rank r of W takes the sub-slice [r·G//W, (r+1)·G//W). The position is (chunk, epoch, consumed):
a prefix of a world-size-independent order, so exactly-once across restarts and resizes is structural.
Resume plans the remaining positions only: shards holding no remaining id are never opened and
consumed rows are dropped before decode.

Why per-worker streams and not `get_dataset_shard`: streaming_split(equal=True) drops rows to even
the ranks out and has no resumable state in Ray 2.60; here every rank yields the same number of batches
by construction and the position is three integers.

What a batch is. Rank batches leave the host as uint8 "wire" batches at the JPEG's DCT-scaled decode size
(decoded straight into the batch's buffer, no per-sample copies); `finisher()` resizes, flips and
normalises them on the training device, where that costs microseconds (transforms.BatchFinisher).

Backends (who decodes). "thread": a thread pool in the Train worker; libjpeg-turbo releases the GIL,
but the Python around each decode does not, so threads stop scaling (H200 box, 16 cores, 224: 4.9K
img/s with 8 threads, 2.8K with 16). "process": a persistent torch DataLoader whose worker processes
decode whole rank batches into shared memory (same box: 8.6K img/s at 224, 23K at 56 with 16).
"auto" (default) picks threads for <= 4 decode workers, else processes. "ray": the same units as Ray
Data map_batches tasks; ~0.3x the thread backend on the 2-core dev machine (per-task and object-store
overhead), so it is opt-in. Figures: benchmarks/bench_decode_scaling.py, bench_input.py.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_mmd import storage
from ray_mmd.data import manifest as manifest_mod
from ray_mmd.data.cache import ShardCache
from ray_mmd.data.manifest import Manifest, ShardInfo
from ray_mmd.data.preload import LocalDecoded, SharedDecoded, nbytes
from ray_mmd.data.transforms import (
    KEYS,
    BatchFinisher,
    alloc_wire,
    decode_image,
    decode_into,
    flip_decisions,
    resize_u8,
    wire_shapes,
)
from ray_mmd.errors import UserError

log = logging.getLogger(__name__)

STATE_VERSION = 1
_COLS = ["sample_id", "fg_bg", "mask", "depth", "bg_id"]


@dataclass
class Chunk:
    """One entry of the chunk schedule: sample-id range [lo, hi), trained `epochs` times."""

    lo: int
    hi: int
    epochs: int = 1


@dataclass
class StreamConfig:
    data: str  # packed dataset root URL (local, gs://, memory://)
    split: str = "train"
    chunks: list[Chunk] | None = None  # None = one chunk covering the whole dataset, 1 epoch
    image_size: int = 56
    global_batch_size: int = 256  # constant across world-size changes
    seed: int = 0
    shuffle: bool = True  # seeded per epoch: shard order + rows within shard groups
    flip_p: float = 0.5  # joint horizontal flip of fg_bg, bg, mask, depth
    cache_dir: str | None = None  # node-local shard cache (selective preload); None = read in place
    cache_bytes: int = 2 << 30
    decoded_preload_bytes: int = 0  # >0: decode a chunk once, serve later epochs from memory if it fits
    max_bad_fraction: float = 0.01
    # ---- optional tuning (not part of the order contract except shuffle_window) ----
    shuffle_window: int = 4  # shards whose rows are mixed together (memory ~ this many shard tables)
    backend: str = (
        "auto"  # "thread" | "process" (DataLoader worker processes) | "ray" (Ray Data tasks); auto: see below
    )
    workers: int = 0  # decode threads / Ray Data concurrency; 0 = os.cpu_count()
    unit_samples: int = 64  # samples per decode task
    ray_task_cpus: float = 0.5  # CPUs per Ray Data decode task (Train workers hold the rest)
    decoder: str = "simplejpeg"  # "simplejpeg" (fastest, decodes into the batch buffer) | "pil"
    # page-locked batch buffers. Off by default: allocating them cost more than it saved (H200 box:
    # 2.4K vs 8.5K img/s at 224), and the uint8 batches are small enough for pageable copies
    pin_memory: bool = False
    preload_shared: bool | None = None  # decoded preload in the object store for all ranks; None = auto
    preload_group: str = ""  # runs with the same group share a decoded preload (the trainer: run name)


def _chunks_of(cfg: StreamConfig, man: Manifest) -> list[Chunk]:
    chunks = [c if isinstance(c, Chunk) else Chunk(**c) for c in (cfg.chunks or [Chunk(0, man.id_end, 1)])]
    for c in chunks:
        if c.hi <= c.lo or c.epochs < 1:
            raise UserError(f"bad chunk {c}: need lo < hi and epochs >= 1")
    return chunks


# ---- epoch order ---------------------------------------------------------------------------------


def epoch_order(
    man: Manifest,
    chunk: Chunk,
    chunk_index: int,
    epoch: int,
    split: str,
    seed: int,
    shuffle: bool,
    window: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids in training order, index into man.shards of each id) for one (chunk, epoch)."""
    ids = man.sample_ids(split, chunk.lo, chunk.hi)
    firsts = np.array([s.first_id for s in man.shards], dtype=np.int64)
    sidx = np.searchsorted(firsts, ids, side="right") - 1
    if not shuffle or len(ids) == 0:
        return ids, sidx
    rng = np.random.default_rng([seed, chunk_index, epoch])
    uniq = np.unique(sidx)
    rank_of = np.empty(len(man.shards), dtype=np.int64)
    rank_of[uniq[rng.permutation(len(uniq))]] = np.arange(len(uniq))
    group = rank_of[sidx] // max(1, window)
    order = np.lexsort((rng.random(len(ids)), group))
    return ids[order], sidx[order]


# ---- shard reading (process-global LRU of shard tables, shared by threads and Ray tasks) ---------

_TABLES: OrderedDict[str, pa.Table] = OrderedDict()
_TABLES_MU = threading.Lock()
_SHARD_MU: dict[str, threading.Lock] = {}
OPENED: list[str] = []  # shard URLs this process has opened, in order (tests count these)
PREFETCH_AHEAD = 8  # shards fetched ahead of the reader (node-local cache)
_TABLE_CAP = 5  # a shuffle window (4 shards) + the next one


def _read_table(url: str, shard: ShardInfo, cache: ShardCache | None) -> pa.Table:
    key = f"{url}#{shard.sha256}"
    with _TABLES_MU:
        if key in _TABLES:
            _TABLES.move_to_end(key)
            return _TABLES[key]
        mu = _SHARD_MU.setdefault(key, threading.Lock())
    with mu:  # two threads wanting one shard read it once
        with _TABLES_MU:
            if key in _TABLES:
                return _TABLES[key]
        local = cache.get(url, shard) if cache is not None else None
        if local is not None:
            table = pq.read_table(local, columns=_COLS)
        else:
            fs, path = storage.filesystem(url)
            with fs.open(path, "rb") as f:
                table = pq.read_table(pa.BufferReader(f.read()), columns=_COLS)
        OPENED.append(url)
        with _TABLES_MU:
            _TABLES[key] = table
            while len(_TABLES) > _TABLE_CAP:
                _TABLES.popitem(last=False)
    return table


def shards_opened() -> int:
    """Shard files this process has opened so far (for tests and benchmarks)."""
    return len(OPENED)


def clear_process_caches() -> None:
    """Forget shard tables, bg images and decoded chunks held by this process."""
    with _TABLES_MU:
        _TABLES.clear()
    _BG.clear()
    _DECODED.clear()


@dataclass
class _Unit:
    """A run of consecutive positions of one rank, decoded as one task."""

    ids: np.ndarray
    sidx: np.ndarray


class _Plan:
    """Batch b -> its decode units, computed on demand: planning costs nothing per remaining sample, so
    time-to-first-batch does not grow with the chunk (or with how little of the epoch was consumed)."""

    def __init__(self, ids: np.ndarray, sidx: np.ndarray, nb: int, n_r: int, unit: int) -> None:
        self.ids, self.sidx, self.nb, self.n_r = ids, sidx, nb, n_r
        k = max(1, -(-n_r // unit))
        self.cuts = [i * n_r // k for i in range(k + 1)]

    def __len__(self) -> int:
        return self.nb

    def __getitem__(self, b: int) -> list[_Unit]:
        if not 0 <= b < self.nb:
            raise IndexError(b)
        o, c = b * self.n_r, self.cuts
        return [
            _Unit(self.ids[o + c[j] : o + c[j + 1]], self.sidx[o + c[j] : o + c[j + 1]])
            for j in range(len(c) - 1)
        ]


def _decode_unit(
    root: str,
    shards: dict[int, ShardInfo],
    ids: np.ndarray,
    sidx: np.ndarray,
    size: int,
    lib: str,
    cache: ShardCache | None,
    into: dict[str, np.ndarray],
) -> dict[str, object]:
    """Read the rows of `ids` (only those) from their shards and decode them into `into`, in order.

    Returns ``bg_id`` and a ``reason`` per row ("" = decoded fine).
    """
    n = len(ids)
    blobs: dict[str, list[bytes]] = {k: [b""] * n for k in KEYS}
    bg_id = np.zeros(n, np.int64)
    missing = np.zeros(n, bool)
    for s in np.unique(sidx):
        where = np.nonzero(sidx == s)[0]
        shard = shards[int(s)]
        table = _read_table(storage.join(root, shard.path), shard, cache)
        sid = table.column("sample_id").to_numpy()
        rows = np.clip(np.searchsorted(sid, ids[where]), 0, max(0, len(sid) - 1))
        found = sid[rows] == ids[where] if len(sid) else np.zeros(len(where), bool)
        missing[where[~found]] = True
        sub = table.take(pa.array(rows[found]))  # consumed/other ranks' rows never reach the decoder
        w = where[found]
        for k in KEYS:
            out = blobs[k]
            for i, v in zip(w, sub.column(k).to_pylist(), strict=True):
                out[i] = v or b""
        bg_id[w] = sub.column("bg_id").to_numpy()
    reasons = [""] * n
    for k in KEYS:
        for i, r in enumerate(decode_into(blobs[k], into[k], k != "fg_bg", size, lib)):
            if r and not reasons[i]:
                reasons[i] = f"{k}: {r}"
    for i in np.nonzero(missing)[0]:
        reasons[i] = "sample id not found in its shard"
    return {"bg_id": bg_id, "reason": reasons}


def _ray_decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: one planned unit in, its decoded rows (one per sample, wire layout) out."""
    spec = pickle.loads(batch["spec"][0])
    cache = ShardCache(spec["cache_dir"], spec["cache_bytes"]) if spec["cache_dir"] else None
    into = {k: v.numpy() for k, v in alloc_wire(len(spec["ids"]), spec["shapes"]).items()}
    meta = _decode_unit(
        spec["root"], spec["shards"], spec["ids"], spec["sidx"], spec["size"], spec["lib"], cache, into
    )
    return {**into, "bg_id": meta["bg_id"], "reason": np.array(meta["reason"], dtype=str)}


def _whole_batch(parts: list[tuple]) -> bool:
    """One unit, decoded entirely elsewhere: its output can become the batch buffer."""
    return len(parts) == 1 and parts[0][1] is not None and bool(parts[0][0].all())


class _UnitDecoder(torch.utils.data.Dataset):
    """Process backend: DataLoader "indices" are decode units (ids, sidx). A worker process reads the
    rows from its shards and decodes them into shared memory, which reaches the trainer without a copy."""

    def __init__(self, root, shards, size, lib, shapes, cache_dir, cache_bytes) -> None:
        self.root, self.shards, self.size, self.lib, self.shapes = root, shards, size, lib, shapes
        self.cache_dir, self.cache_bytes = cache_dir, cache_bytes
        self._cache: ShardCache | None = None

    def __getitem__(self, spec: tuple[np.ndarray, np.ndarray]) -> dict:
        ids, sidx = spec
        if self.cache_dir and self._cache is None:
            self._cache = ShardCache(self.cache_dir, self.cache_bytes)
        into = alloc_wire(len(ids), self.shapes, shared=True)
        meta = _decode_unit(
            self.root,
            self.shards,
            ids,
            sidx,
            self.size,
            self.lib,
            self._cache,
            {k: v.numpy() for k, v in into.items()},
        )
        return {**into, "bg_id": meta["bg_id"], "reason": meta["reason"]}


class _Specs(torch.utils.data.Sampler):
    """The process backend's sampler: this epoch's decode units, set before each pass."""

    def __init__(self) -> None:
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


# ---- bg images and decoded preload (process-local; only optimisations, never needed for correctness) --

_BG: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}
_DECODED: dict[tuple, LocalDecoded | SharedDecoded] = {}  # one chunk at a time


def _bg_table(man: Manifest, size: int, lib: str) -> tuple[torch.Tensor, np.ndarray]:
    """All bg images decoded once and resized to size: (uint8 [max_id+1,3,S,S], bad bool[max_id+1])."""
    key = (man.root, man.bg.sha256, size)
    if key not in _BG:
        t = pq.read_table(pa.BufferReader(storage.read_bytes(man.url(man.bg.path))))
        bid = t.column("bg_id").to_numpy()
        imgs = t.column("image").to_pylist()
        n = int(bid.max()) + 1 if len(bid) else 1
        bad = np.ones(n, bool)
        arrs = [np.zeros((size, size, 3), np.uint8)] * n
        for b, data in zip(bid, imgs, strict=True):
            try:
                arrs[b] = decode_image(data, size, False, lib)
                bad[b] = False
            except Exception as e:
                log.warning("bg image %d does not decode (%s); its samples are quarantined", b, e)
        _BG[key] = (resize_u8(arrs, size), bad)
    return _BG[key]


def make_finisher(man: Manifest, size: int, lib: str = "simplejpeg") -> BatchFinisher:
    """The BatchFinisher for this dataset at this stage size (holds the bg table)."""
    return BatchFinisher(man.stats, _bg_table(man, size, lib)[0], size)


# ---- the stream -----------------------------------------------------------------------------------


class DataStream:
    """This rank's view of the chunk schedule; owns the resumable position (see module docstring)."""

    def __init__(self, cfg: StreamConfig, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if cfg.global_batch_size < world_size:
            raise UserError(
                f"global_batch_size={cfg.global_batch_size} is smaller than the {world_size} workers: raise it"
            )
        if cfg.backend not in ("auto", "thread", "process", "ray"):
            raise UserError(
                f"unknown stream backend {cfg.backend!r}: use 'auto', 'thread', 'process' or 'ray'"
            )
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.man = manifest_mod.load(cfg.data)
        self.chunks = _chunks_of(cfg, self.man)
        self._pos = [0, 0, 0]
        self._dropped_total = 0
        self._order_key: tuple | None = None
        self._order: tuple[np.ndarray, np.ndarray] | None = None
        self.cache = ShardCache(cfg.cache_dir, cfg.cache_bytes) if cfg.cache_dir else None
        self._workers = cfg.workers or os.cpu_count() or 2
        # threads share the GIL for the Python around each decode: past ~4 they stop scaling
        self._backend = (
            cfg.backend if cfg.backend != "auto" else ("process" if self._workers > 4 else "thread")
        )
        self._loader: torch.utils.data.DataLoader | None = None
        if cfg.decoder not in ("simplejpeg", "pil", "auto"):
            raise UserError(f"unknown decoder {cfg.decoder!r}: use 'simplejpeg' or 'pil'")
        self._lib = "simplejpeg" if cfg.decoder == "auto" else cfg.decoder
        # batch buffer shapes: decode size, or the stage size when decoded preload keeps samples
        self._shapes = wire_shapes(self.man.sizes, cfg.image_size, cfg.decoded_preload_bytes > 0)
        self._quarantine: list[dict] = []
        self._mu = threading.Lock()
        self._counts = {"samples": 0, "dropped": 0, "quarantined": 0, "decoded": 0, "preload_hits": 0}
        self._opens0 = shards_opened()

    # ---- position ----------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        c = self.cfg
        return {
            "split": c.split,
            "seed": c.seed,
            "shuffle": c.shuffle,
            "shuffle_window": c.shuffle_window,
            "chunks": [[k.lo, k.hi, k.epochs] for k in self.chunks],
        }

    def state_dict(self) -> dict:
        ci, ep, consumed = self._pos
        return {
            "version": STATE_VERSION,
            "chunk_index": ci,
            "epoch": ep,
            "consumed": consumed,
            "dropped": self._dropped_total,
            "global_batch_size": self.cfg.global_batch_size,
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self._fingerprint()
        for k, v in mine.items():
            if k in state and state[k] != v:
                raise UserError(
                    f"saved data position was made with {k}={state[k]!r} but the config says {v!r}: "
                    "restore the original data config or start a new run"
                )
        self._pos = [int(state["chunk_index"]), int(state["epoch"]), int(state["consumed"])]
        self._dropped_total = int(state.get("dropped", 0))

    @property
    def done(self) -> bool:
        return self._pos[0] >= len(self.chunks)

    @property
    def position(self) -> tuple[int, int, int]:
        return (self._pos[0], self._pos[1], self._pos[2])

    def _current_order(self) -> tuple[np.ndarray, np.ndarray]:
        ci, ep, _ = self._pos
        key = (ci, ep)
        if self._order_key != key:
            c = self.cfg
            self._order = epoch_order(
                self.man, self.chunks[ci], ci, ep, c.split, c.seed, c.shuffle, c.shuffle_window
            )
            self._order_key = key
        assert self._order is not None
        return self._order

    def steps_in_epoch(self) -> int:
        """Full global batches of the current (chunk, epoch) in total (not only those left); 0 when done."""
        if self.done:
            return 0
        return len(self._current_order()[0]) // self.cfg.global_batch_size

    def steps_left(self) -> int:
        """Full global batches still to come in the current (chunk, epoch)."""
        if self.done:
            return 0
        return (len(self._current_order()[0]) - self._pos[2]) // self.cfg.global_batch_size

    def _advance(self, n_total: int, consumed0: int) -> None:
        dropped = (n_total - consumed0) % self.cfg.global_batch_size if n_total > consumed0 else 0
        self._dropped_total += dropped
        self._counts["dropped"] += dropped
        ci, ep, _ = self._pos
        self._pos = [ci, ep + 1, 0] if ep + 1 < self.chunks[ci].epochs else [ci + 1, 0, 0]

    def close(self) -> None:
        """Stop background shard prefetches (waits for running downloads) and decode worker processes.
        The stream stays usable."""
        if self.cache is not None:
            self.cache.close()
        if self._loader is not None:
            it = getattr(self._loader, "_iterator", None)
            if it is not None:
                it._shutdown_workers()
            self._loader = None

    def stats(self) -> dict:
        out = dict(self._counts)
        out["dropped_total"] = self._dropped_total
        out["shards_opened"] = shards_opened() - self._opens0
        out["quarantine"] = list(self._quarantine[:100])
        if self.cache is not None:
            out.update({f"cache_{k}": v for k, v in self.cache.counters.items()})
        return out

    def finisher(self) -> BatchFinisher:
        """Turns this stream's wire batches into model tensors on the batch's device (see transforms)."""
        return make_finisher(self.man, self.cfg.image_size, self._lib)

    def model_batches(self, device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
        """epoch_batches() finished on `device`: x n×6×S×S, mask/depth n×1×S×S, sample_id."""
        fin = self.finisher().to(device)
        for b in self.epoch_batches():
            yield fin({k: v.to(device, non_blocking=True) for k, v in b.items()})

    # ---- batches -----------------------------------------------------------------------------

    def _prefetcher(self, my_sidx: np.ndarray, n_r: int):
        """A pump(b) that keeps the shards needed up to batch b plus PREFETCH_AHEAD more in flight, in
        order of first need, then (once this chunk's are all asked for) the next chunk's shards.

        Bounded lookahead: fetching a whole chunk at once would compete with the first batches for
        bandwidth and CPU, making time-to-first-batch grow with the chunk.
        """
        if self.cache is None:
            return lambda b: None
        ci = self._pos[0]
        uniq, first = np.unique(my_sidx, return_index=True)
        o = np.argsort(first)
        need = [self.man.shards[int(s)] for s in uniq[o]]
        need_batch = first[o] // max(1, n_r)
        nxt: list[ShardInfo] = []
        if ci + 1 < len(self.chunks):  # the next chunk, without evicting this one
            c = self.chunks[ci + 1]
            here = {s.path for s in self.man.shards_overlapping(self.chunks[ci].lo, self.chunks[ci].hi)}
            nxt = [s for s in self.man.shards_overlapping(c.lo, c.hi) if s.path not in here]
        state = {"sent": 0, "next_sent": not nxt}

        def pump(b: int) -> None:
            target = min(len(need), int(np.searchsorted(need_batch, b, side="right")) + PREFETCH_AHEAD)
            if target > state["sent"]:
                self.cache.prefetch(
                    [(self.man.url(s.path), s) for s in need[state["sent"] : target]],
                    protect=need[: state["sent"]],
                )
                state["sent"] = target
            if state["sent"] == len(need) and not state["next_sent"]:
                self.cache.prefetch([(self.man.url(s.path), s) for s in nxt], protect=need)
                state["next_sent"] = True

        return pump

    def _shared_preload(self) -> bool:
        """Share decoded samples between ranks through the object store (auto: under Ray, with W > 1)."""
        if self.cfg.preload_shared is not None:
            return self.cfg.preload_shared
        ray = sys.modules.get("ray")
        return self.world_size > 1 and ray is not None and ray.is_initialized()

    def _preload(self) -> LocalDecoded | SharedDecoded | None:
        c = self.cfg
        if c.decoded_preload_bytes <= 0:
            return None
        chunk = self.chunks[self._pos[0]]
        key = (self.man.root, c.split, chunk.lo, chunk.hi, c.image_size, c.preload_group)
        if key not in _DECODED:
            ids = self.man.sample_ids(c.split, chunk.lo, chunk.hi)
            if nbytes(len(ids), c.image_size) > c.decoded_preload_bytes:
                return None
            for old in _DECODED.values():
                if isinstance(old, SharedDecoded):
                    old.close()
            _DECODED.clear()
            _DECODED[key] = (
                SharedDecoded(key, ids) if self._shared_preload() else LocalDecoded(ids, self._shapes)
            )
        return _DECODED[key]

    def _fill_unit(
        self,
        u: _Unit,
        view: dict[str, np.ndarray],
        pre: LocalDecoded | SharedDecoded | None,
        shards: dict[int, ShardInfo],
        decoded: dict | None = None,
        decoded_rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[str]]:
        """Fill `view` (unit u's rows of its batch buffer): rows a Ray task decoded (`decoded`,
        `decoded_rows`), then rows the decoded preload holds, then decode whatever is left here.

        Returns (bg_id, reason per row).
        """
        n = len(u.ids)
        bg_id, reasons = np.zeros(n, np.int64), [""] * n
        have, fresh = np.zeros(n, bool), np.zeros(n, bool)

        def take(where: np.ndarray, d: dict) -> None:
            bg_id[where] = d["bg_id"]
            for i, r in zip(where, d["reason"], strict=True):
                reasons[i] = str(r)
            have[where] = fresh[where] = True
            self._add("decoded", len(where))

        if decoded is not None:
            where = np.nonzero(decoded_rows)[0]
            for k in KEYS:
                src = np.asarray(decoded[k])
                if len(where) == n:
                    if src.ctypes.data != view[k].ctypes.data:  # else it already is the batch buffer
                        view[k][:] = src
                else:
                    view[k][where] = src
            take(where, decoded)
        if pre is not None and not have.all():
            where = np.nonzero(~have)[0]
            got, bg = pre.fill(u.ids[where], view, where)
            have[where[got]] = True
            bg_id[where[got]] = bg[got]
            self._add("preload_hits", int(got.sum()))
        if not have.all():
            where = np.nonzero(~have)[0]
            whole = len(where) == n
            into = view if whole else {k: v.numpy() for k, v in alloc_wire(len(where), self._shapes).items()}
            meta = _decode_unit(
                self.man.root,
                shards,
                u.ids[where],
                u.sidx[where],
                self.cfg.image_size,
                self._lib,
                self.cache,
                into,
            )
            if not whole:
                for k in KEYS:
                    view[k][where] = into[k]
            take(where, meta)
        if pre is not None and fresh.any():
            ok = fresh & np.array([not r for r in reasons], dtype=bool)
            if ok.any():
                pre.put(u.ids[ok], {k: view[k][ok] for k in KEYS}, bg_id[ok])
        return bg_id, reasons

    def _add(self, k: str, n: int) -> None:
        with self._mu:
            self._counts[k] += n

    def _assemble(
        self, filled: list, buf: dict[str, torch.Tensor], ids: np.ndarray, flips: np.ndarray
    ) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """One rank batch's filled buffer -> wire batch; samples that failed to decode are taken out."""
        filled = [f.result() if isinstance(f, Future) else f for f in filled]
        bg_id = np.concatenate([f[0] for f in filled])
        reasons = [r for f in filled for r in f[1]]
        _, bg_bad = _bg_table(self.man, self.cfg.image_size, self._lib)
        known = bg_id < len(bg_bad)
        ok = np.array([not r for r in reasons], dtype=bool) & known & ~bg_bad[np.where(known, bg_id, 0)]
        bad = [
            {"sample_id": int(ids[i]), "reason": reasons[i] or "bg image does not decode"}
            for i in np.nonzero(~ok)[0]
        ]
        out = {
            **buf,
            "bg_id": torch.from_numpy(bg_id),
            "flip": torch.from_numpy(np.ascontiguousarray(flips, dtype=bool)),
            "sample_id": torch.from_numpy(ids.astype(np.int64)),
        }
        if not ok.all():
            keep = torch.from_numpy(np.nonzero(ok)[0])
            out = {k: v.index_select(0, keep) for k, v in out.items()}
        return out, bad

    def _batches(
        self, plan: Sequence[list[_Unit]], flips: list[np.ndarray], pre: LocalDecoded | SharedDecoded | None
    ) -> Iterator[tuple[dict[str, torch.Tensor], list[dict]]]:
        """(wire batch, quarantined) per planned batch, in order; units decode ahead, straight into
        each batch's (optionally pinned) buffer."""
        shards = dict(enumerate(self.man.shards))
        dec = ThreadPoolExecutor(self._workers, thread_name_prefix="decode")
        per_batch = max(1, sum(len(u.ids) for u in plan[0])) if plan else 1
        ahead = max(2, -(-2 * self._workers * self.cfg.unit_samples // per_batch) + 1)
        pending: deque[tuple] = deque()
        src = self._offload_parts(plan, pre, shards) if self._backend != "thread" else None
        try:
            for b in range(len(plan)):
                while len(pending) < ahead and b + len(pending) < len(plan):
                    k = b + len(pending)
                    units = plan[k]
                    parts = next(src) if src is not None else None
                    whole = parts is not None and _whole_batch(parts) and self._backend == "process"
                    if whole and not self.cfg.pin_memory:  # the worker's shared memory is the batch
                        buf = {key: parts[0][1][key] for key in KEYS}
                    else:
                        n_b = sum(len(u.ids) for u in units)
                        buf = alloc_wire(n_b, self._shapes, pin=self.cfg.pin_memory)
                    arrs = {key: v.numpy() for key, v in buf.items()}
                    cuts = np.cumsum([0] + [len(u.ids) for u in units])
                    views = [
                        {key: a[lo:hi] for key, a in arrs.items()} for lo, hi in itertools.pairwise(cuts)
                    ]
                    if parts is not None:
                        filled = [
                            self._fill_unit(u, v, pre, shards, d, need)
                            for u, v, (need, d) in zip(units, views, parts, strict=True)
                        ]
                    else:
                        filled = [
                            dec.submit(self._fill_unit, u, v, pre, shards)
                            for u, v in zip(units, views, strict=True)
                        ]
                    ids = np.concatenate([u.ids for u in units])
                    pending.append((filled, buf, ids, flips[k]))
                yield self._assemble(*pending.popleft())
        finally:
            for filled, *_ in pending:
                for f in filled:
                    if isinstance(f, Future):
                        f.cancel()
            if src is not None:
                src.close()
            # queued units are dropped; running ones (< one unit per thread) finish, so no thread
            # touches storage after the generator is closed
            dec.shutdown(wait=True, cancel_futures=True)

    def _offload_parts(self, plan: Sequence[list[_Unit]], pre, shards) -> Iterator[list[tuple]]:
        """Process and Ray Data backends: the rows not in the decoded preload are decoded elsewhere,
        in plan order. Yields per batch, per unit, (rows to decode, their decoded output or None)."""
        have = (
            pre.has(np.concatenate([u.ids for us in plan for u in us]))
            if pre is not None and len(plan)
            else None
        )
        needs, specs, o = [], [], 0
        for us in plan:
            needs.append([])
            for u in us:
                need = ~have[o : o + len(u.ids)] if have is not None else np.ones(len(u.ids), bool)
                o += len(u.ids)
                needs[-1].append(need)
                if need.any():
                    specs.append((u.ids[need], u.sidx[need]))
        decoded: Iterator[dict] = iter(())
        if specs:
            decoded = (
                self._ray_decoded(specs, shards) if self._backend == "ray" else self._proc_decoded(specs)
            )
        for ns in needs:
            yield [(need, next(decoded) if need.any() else None) for need in ns]

    def _proc_decoded(self, specs: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[dict]:
        """Decode units in this stream's worker processes (a persistent torch DataLoader), in order."""
        if self._loader is None:
            c = self.cfg
            ds = _UnitDecoder(
                self.man.root, dict(enumerate(self.man.shards)), c.image_size, self._lib, self._shapes,
                c.cache_dir, c.cache_bytes,
            )  # fmt: skip
            self._loader = torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                sampler=_Specs(),
                num_workers=self._workers,
                # forked once per stream (as DataLoaders in Ray Train workers usually are); a worker
                # touches only its own shard tables and cache, never this process's threads or CUDA
                persistent_workers=True,
                prefetch_factor=2,
            )
        self._loader.sampler.items = specs
        return iter(self._loader)

    def _ray_decoded(self, specs: list[tuple[np.ndarray, np.ndarray]], shards) -> Iterator[dict]:
        """Decode units as Ray Data map_batches tasks, in order."""
        import ray

        c = self.cfg
        items = [
            {
                "spec": pickle.dumps(
                    {
                        "root": self.man.root,
                        "shards": {int(k): shards[int(k)] for k in np.unique(sidx)},
                        "ids": ids,
                        "sidx": sidx,
                        "size": c.image_size,
                        "shapes": self._shapes,
                        "lib": self._lib,
                        "cache_dir": c.cache_dir,
                        "cache_bytes": c.cache_bytes,
                    }
                )
            }
            for ids, sidx in specs
        ]
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # batches must come back in plan order
        node = ray.get_runtime_context().get_node_id()
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ray_decode_batch,
            batch_size=1,
            num_cpus=c.ray_task_cpus,
            compute=ray.data.TaskPoolStrategy(size=self._workers),
            # decode on this worker's node, where the batches are consumed; anywhere if it is full
            label_selector={"ray.io/node-id": node},
            fallback_strategy=[{"label_selector": {}}],
        )
        return iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))

    def _record_bad(self, bad: list[dict], ci: int, bad_in_epoch: int, share: int) -> None:
        """Quarantine `bad`; stop the run when more than max_bad_fraction of this rank's share of the
        (chunk, epoch) failed. Per epoch: a sample that never decodes is met again every epoch."""
        if not bad:
            return
        self._quarantine.extend(bad)
        self._counts["quarantined"] += len(bad)
        log.warning(
            "quarantined %d samples of chunk %d: %s",
            len(bad),
            ci,
            "; ".join(f"{q['sample_id']} ({q['reason']})" for q in bad[:5]),
        )
        if bad_in_epoch > self.cfg.max_bad_fraction * max(1, share):
            q = bad[0]
            raise UserError(
                f"{bad_in_epoch} of this rank's {share} samples of chunk {ci} failed to decode, more than "
                f"max_bad_fraction={self.cfg.max_bad_fraction} (e.g. sample {q['sample_id']}: {q['reason']}); "
                "re-pack the dataset or raise max_bad_fraction"
            )

    def _plan(self, ids: np.ndarray, sidx: np.ndarray, nb: int, n_r: int) -> _Plan:
        """Split each rank batch into decode units: for threads at most unit_samples and at least one
        per thread (the first and last batch use every thread); a worker process decodes a whole rank
        batch (handing over a unit costs ~ms; many batches are in flight); a Ray task, 4x unit_samples."""
        us = {"ray": 4 * self.cfg.unit_samples, "process": n_r}.get(
            self._backend, min(self.cfg.unit_samples, -(-n_r // self._workers))
        )
        return _Plan(ids, sidx, nb, n_r, max(1, us))

    def epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's slice of each remaining global batch of the current (chunk, epoch), in order,
        as wire batches (uint8 at decode size + bg_id + flip + sample_id; `finisher()` makes model
        tensors of them on the training device).

        Yielding batch k marks it consumed. When exhausted the position moves to the next
        (chunk, epoch); a final remainder smaller than a global batch is dropped and counted.
        """
        if self.done:
            return
        c = self.cfg
        ci, ep, consumed0 = self._pos
        ids, sidx = self._current_order()
        G, W, r = c.global_batch_size, self.world_size, self.rank
        nb = max(0, (len(ids) - consumed0) // G)
        if nb == 0:
            self._advance(len(ids), consumed0)
            return
        offs = np.arange(r * G // W, (r + 1) * G // W)
        n_r = len(offs)
        pos = (consumed0 + np.arange(nb)[:, None] * G + offs[None, :]).ravel()
        my_ids, my_sidx = ids[pos], sidx[pos]
        flips = flip_decisions(my_ids, c.flip_p, c.seed, ci, ep)
        pump = self._prefetcher(my_sidx, n_r)
        pump(0)
        plan = self._plan(my_ids, my_sidx, nb, n_r)
        pre = self._preload()
        if pre is not None:
            pre.begin_epoch(expect_hits=ep > 0)
        src = self._batches(plan, [flips[b * n_r : (b + 1) * n_r] for b in range(nb)], pre)
        n_bad = 0
        try:
            for b, (batch, bad) in enumerate(src):
                pump(b + 1)
                n_bad += len(bad)
                self._record_bad(bad, ci, n_bad, len(ids) // W)
                self._counts["samples"] += len(batch["sample_id"])
                self._pos[2] = consumed0 + (b + 1) * G
                yield batch
        finally:
            src.close()
        self._advance(len(ids), consumed0)


# ---- evaluation -----------------------------------------------------------------------------------


def eval_batches(
    cfg: StreamConfig, rank: int, world_size: int, batch_size: int, max_samples: int | None = None
) -> Iterator[dict]:
    """Test-split batches (whole dataset, no shuffle or flip); rank r gets a disjoint contiguous slice.

    The last batch of a rank may be short; ranks may differ by one batch.
    """
    stream = DataStream(
        StreamConfig(**{**cfg.__dict__, "shuffle": False, "flip_p": 0.0, "decoded_preload_bytes": 0}),
        rank,
        world_size,
    )
    man = stream.man
    ids = man.sample_ids("test")
    if max_samples is not None:
        ids = ids[:max_samples]
    ids = ids[rank * len(ids) // world_size : (rank + 1) * len(ids) // world_size]
    firsts = np.array([s.first_id for s in man.shards], dtype=np.int64)
    sidx = np.searchsorted(firsts, ids, side="right") - 1
    plan, flips = [], []
    for i in range(0, len(ids), batch_size):
        n = min(batch_size, len(ids) - i)
        plan.append(stream._plan(ids[i : i + n], sidx[i : i + n], 1, n)[0])
        flips.append(np.zeros(n, bool))
    n_bad = 0
    for batch, bad in stream._batches(plan, flips, None):
        n_bad += len(bad)
        stream._record_bad(bad, -1, n_bad, len(ids))
        yield batch
