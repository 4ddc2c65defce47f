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
"""

from __future__ import annotations

import logging
import os
import pickle
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
from ray_mmd.data.transforms import Normalizer, decode_image, decode_samples, flip_decisions, resize_u8
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
    backend: str = "thread"  # "thread": in-process pool (PIL, GIL-free); "ray": Ray Data map_batches
    workers: int = 0  # decode threads / Ray Data concurrency; 0 = os.cpu_count()
    unit_samples: int = 64  # samples per decode task
    ray_task_cpus: float = 0.5  # CPUs per Ray Data decode task (Train workers hold the rest)
    decoder: str = "auto"  # "pil" | "simplejpeg" | "auto" (pil in threads, simplejpeg in Ray tasks)


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
) -> dict[str, object]:
    """Read the rows of `ids` (only those) from their shards and decode them, in the given order."""
    n = len(ids)
    fg_b: list[bytes] = [b""] * n
    m_b: list[bytes] = [b""] * n
    d_b: list[bytes] = [b""] * n
    bg_id = np.zeros(n, np.int32)
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
        for col, out in (("fg_bg", fg_b), ("mask", m_b), ("depth", d_b)):
            for i, v in zip(w, sub.column(col).to_pylist(), strict=True):
                out[i] = v or b""
        bg_id[w] = sub.column("bg_id").to_numpy()
    fg, mask, depth, ok, reasons = decode_samples(fg_b, m_b, d_b, size, lib)
    for i in np.nonzero(missing)[0]:
        ok[i], reasons[i] = False, "sample id not found in its shard"
    return {
        "sample_id": ids,
        "fg": fg.numpy(),
        "mask": mask.numpy(),
        "depth": depth.numpy(),
        "bg_id": bg_id,
        "ok": ok,
        "reason": np.array(reasons, dtype=object),
    }


def _ray_decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: one planned unit in, its decoded rows out."""
    spec = pickle.loads(batch["spec"][0])
    cache = ShardCache(spec["cache_dir"], spec["cache_bytes"]) if spec["cache_dir"] else None
    out = _decode_unit(
        spec["root"], spec["shards"], spec["ids"], spec["sidx"], spec["size"], spec["lib"], cache
    )
    out["reason"] = out["reason"].astype(str)
    return out


# ---- bg images and decoded preload (process-local; only optimisations, never needed for correctness) --

_BG: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}
_DECODED: dict[tuple, _DecodedChunk] = {}


def _bg_table(man: Manifest, size: int, lib: str) -> tuple[torch.Tensor, np.ndarray]:
    """All bg images decoded once at `size`: (uint8 [max_id+1,3,S,S], bad bool[max_id+1])."""
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


class _DecodedChunk:
    """Decoded uint8 samples of one chunk, filled as they are first decoded (any rank order)."""

    def __init__(self, ids: np.ndarray, size: int) -> None:
        self.ids = ids
        n = len(ids)
        self.fg = torch.empty((n, 3, size, size), dtype=torch.uint8)
        self.mask = torch.empty((n, size, size), dtype=torch.uint8)
        self.depth = torch.empty((n, size, size), dtype=torch.uint8)
        self.bg_id = np.zeros(n, np.int32)
        self.have = np.zeros(n, bool)

    @staticmethod
    def nbytes(n: int, size: int) -> int:
        return n * (5 * size * size + 4)

    def index(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, ids)

    def put(self, d: dict) -> None:
        ok = d["ok"]
        idx = self.index(d["sample_id"][ok])
        self.fg[idx] = torch.as_tensor(d["fg"][ok])
        self.mask[idx] = torch.as_tensor(d["mask"][ok])
        self.depth[idx] = torch.as_tensor(d["depth"][ok])
        self.bg_id[idx] = d["bg_id"][ok]
        self.have[idx] = True

    def get(self, ids: np.ndarray) -> dict:
        idx = self.index(ids)
        return {
            "sample_id": ids,
            "fg": self.fg[idx].numpy(),
            "mask": self.mask[idx].numpy(),
            "depth": self.depth[idx].numpy(),
            "bg_id": self.bg_id[idx],
            "ok": np.ones(len(ids), bool),
            "reason": np.array([""] * len(ids), dtype=object),
        }


def _merge(parts: list[dict], order_ids: np.ndarray) -> dict:
    """Concatenate unit parts and put rows back in `order_ids` order."""
    if len(parts) == 1 and np.array_equal(parts[0]["sample_id"], order_ids):
        return parts[0]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    pos = {int(s): i for i, s in enumerate(cat["sample_id"])}
    take = np.array([pos[int(s)] for s in order_ids], dtype=np.int64)
    return {k: v[take] for k, v in cat.items()}


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
        if cfg.backend not in ("thread", "ray"):
            raise UserError(f"unknown stream backend {cfg.backend!r}: use 'thread' or 'ray'")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.man = manifest_mod.load(cfg.data)
        self.chunks = _chunks_of(cfg, self.man)
        self._pos = [0, 0, 0]
        self._dropped_total = 0
        self._order_key: tuple | None = None
        self._order: tuple[np.ndarray, np.ndarray] | None = None
        self._norm = Normalizer(self.man.stats)
        self.cache = ShardCache(cfg.cache_dir, cfg.cache_bytes) if cfg.cache_dir else None
        self._workers = cfg.workers or os.cpu_count() or 2
        self._lib = (
            cfg.decoder if cfg.decoder != "auto" else ("simplejpeg" if cfg.backend == "ray" else "pil")
        )
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
        """Stop background shard prefetches (waits for running downloads). The stream stays usable."""
        if self.cache is not None:
            self.cache.close()

    def stats(self) -> dict:
        out = dict(self._counts)
        out["dropped_total"] = self._dropped_total
        out["shards_opened"] = shards_opened() - self._opens0
        out["quarantine"] = list(self._quarantine[:100])
        if self.cache is not None:
            out.update({f"cache_{k}": v for k, v in self.cache.counters.items()})
        return out

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

    def _preload(self) -> _DecodedChunk | None:
        c = self.cfg
        if c.decoded_preload_bytes <= 0:
            return None
        chunk = self.chunks[self._pos[0]]
        key = (self.man.root, c.split, chunk.lo, chunk.hi, c.image_size)
        if key not in _DECODED:
            ids = self.man.sample_ids(c.split, chunk.lo, chunk.hi)
            if _DecodedChunk.nbytes(len(ids), c.image_size) > c.decoded_preload_bytes:
                return None
            _DECODED.clear()  # one chunk at a time
            _DECODED[key] = _DecodedChunk(ids, c.image_size)
        return _DECODED[key]

    def _decode_fn(self, pre: _DecodedChunk | None, shards: dict[int, ShardInfo]):
        """unit -> decoded dict, from the decoded preload where possible, else decoded now."""
        size, root = self.cfg.image_size, self.man.root

        def work(u: _Unit) -> dict:
            need = ~pre.have[pre.index(u.ids)] if pre is not None else np.ones(len(u.ids), bool)
            parts = []
            if need.any():
                d = _decode_unit(root, shards, u.ids[need], u.sidx[need], size, self._lib, self.cache)
                self._add("decoded", len(d["sample_id"]))
                if pre is not None:
                    pre.put(d)
                parts.append(d)
            if (~need).any():
                parts.append(pre.get(u.ids[~need]))
                self._add("preload_hits", int((~need).sum()))
            return _merge(parts, u.ids)

        return work

    def _add(self, k: str, n: int) -> None:
        with self._mu:
            self._counts[k] += n

    def _assemble(self, parts: list, flips: np.ndarray) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """Decoded units of one rank batch -> model tensors (runs in a pool thread; torch frees the GIL)."""
        parts = [p.result() if isinstance(p, Future) else p for p in parts]
        d = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]
        bg, bg_bad = _bg_table(self.man, self.cfg.image_size, self._lib)
        ok = d["ok"] & ~bg_bad[np.clip(d["bg_id"], 0, len(bg_bad) - 1)]
        bad = [
            {"sample_id": int(d["sample_id"][i]), "reason": str(d["reason"][i]) or "bg image does not decode"}
            for i in np.nonzero(~ok)[0]
        ]
        keep = np.nonzero(ok)[0]
        # flipped samples first within the batch (a fixed, seeded order): flips become slice copies
        fl = flips[keep]
        keep = np.concatenate([keep[fl], keep[~fl]])
        fg, mask, depth = (torch.from_numpy(d[k]) for k in ("fg", "mask", "depth"))
        if len(keep) < len(ok) or not np.array_equal(keep, np.arange(len(ok))):
            t = torch.from_numpy(keep)
            fg, mask, depth = fg.index_select(0, t), mask.index_select(0, t), depth.index_select(0, t)
        out = self._norm(
            fg,
            bg.index_select(0, torch.from_numpy(d["bg_id"][keep].astype(np.int64))),
            mask,
            depth,
            flips[keep],
        )
        out["sample_id"] = torch.from_numpy(d["sample_id"][keep].astype(np.int64))
        return out, bad

    def _batches(
        self, plan: Sequence[list[_Unit]], flips: list[np.ndarray], pre: _DecodedChunk | None
    ) -> Iterator[tuple[dict[str, torch.Tensor], list[dict]]]:
        """(tensors, quarantined) per planned batch, in order; decode and assembly run ahead in pools."""
        shards = dict(enumerate(self.man.shards))
        work = self._decode_fn(pre, shards)
        dec = ThreadPoolExecutor(self._workers, thread_name_prefix="decode")
        asm = ThreadPoolExecutor(1, thread_name_prefix="assemble")
        per_batch = max(1, sum(len(u.ids) for u in plan[0])) if plan else 1
        ahead = max(2, -(-2 * self._workers * self.cfg.unit_samples // per_batch) + 1)
        pending: deque[Future] = deque()
        src = self._ray_parts(plan, pre, shards) if self.cfg.backend == "ray" else None
        try:
            for b in range(len(plan)):
                while len(pending) < ahead and b + len(pending) < len(plan):
                    k = b + len(pending)
                    parts = next(src) if src is not None else [dec.submit(work, u) for u in plan[k]]
                    pending.append(asm.submit(self._assemble, parts, flips[k]))
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            if src is not None:
                src.close()
            # queued units are dropped; running ones (< one unit per thread) finish, so no thread
            # touches storage after the generator is closed
            dec.shutdown(wait=True, cancel_futures=True)
            asm.shutdown(wait=True, cancel_futures=True)

    def _ray_parts(self, plan: Sequence[list[_Unit]], pre, shards) -> Iterator[list[dict]]:
        """Ray Data backend: decode the planned units in map_batches tasks, in order; parts per batch."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        c = self.cfg
        needs = [
            [~pre.have[pre.index(u.ids)] if pre is not None else np.ones(len(u.ids), bool) for u in us]
            for us in plan
        ]
        items = []
        for us, ns in zip(plan, needs, strict=True):
            for u, need in zip(us, ns, strict=True):
                if need.any():
                    spec = {
                        "root": self.man.root,
                        "shards": {int(k): shards[int(k)] for k in np.unique(u.sidx[need])},
                        "ids": u.ids[need],
                        "sidx": u.sidx[need],
                        "size": c.image_size,
                        "lib": self._lib,
                        "cache_dir": c.cache_dir,
                        "cache_bytes": c.cache_bytes,
                    }
                    items.append({"spec": pickle.dumps(spec)})
        decoded: Iterator[dict] = iter(())
        if items:
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True  # batches must come back in plan order
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                _ray_decode_batch,
                batch_size=1,
                num_cpus=c.ray_task_cpus,
                compute=ray.data.TaskPoolStrategy(size=self._workers),
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    ray.get_runtime_context().get_node_id(), soft=True
                ),
            )
            decoded = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
        for us, ns in zip(plan, needs, strict=True):
            out = []
            for u, need in zip(us, ns, strict=True):
                parts = []
                if need.any():
                    d = {k: v if v.flags.writeable else v.copy() for k, v in next(decoded).items()}
                    d["reason"] = d["reason"].astype(object)
                    self._add("decoded", len(d["sample_id"]))
                    if pre is not None:
                        pre.put(d)
                    parts.append(d)
                if (~need).any():
                    parts.append(pre.get(u.ids[~need]))
                    self._add("preload_hits", int((~need).sum()))
                out.append(_merge(parts, u.ids))
            yield out

    def _record_bad(self, bad: list[dict], ci: int, n_epoch: int) -> None:
        if not bad:
            return
        self._quarantine.extend(bad)
        self._counts["quarantined"] += len(bad)
        if self._counts["quarantined"] > self.cfg.max_bad_fraction * max(1, n_epoch):
            q = self._quarantine[0]
            raise UserError(
                f"{self._counts['quarantined']} samples of chunk {ci} failed to decode, more than "
                f"max_bad_fraction={self.cfg.max_bad_fraction} (first: sample {q['sample_id']}: {q['reason']}); "
                "re-pack the dataset or raise max_bad_fraction"
            )

    def _plan(self, ids: np.ndarray, sidx: np.ndarray, nb: int, n_r: int) -> _Plan:
        """Split each rank batch into ~unit_samples decode units (bigger units for Ray tasks)."""
        us = max(1, self.cfg.unit_samples * (4 if self.cfg.backend == "ray" else 1))
        return _Plan(ids, sidx, nb, n_r, us)

    def epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's slice of each remaining global batch of the current (chunk, epoch), in order.

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
        src = self._batches(plan, [flips[b * n_r : (b + 1) * n_r] for b in range(nb)], self._preload())
        try:
            for b, (batch, bad) in enumerate(src):
                pump(b + 1)
                self._record_bad(bad, ci, len(ids))
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
    for batch, bad in stream._batches(plan, flips, None):
        stream._record_bad(bad, -1, max(1, len(ids)))
        yield batch
