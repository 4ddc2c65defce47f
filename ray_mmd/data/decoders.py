"""Who decodes: reading a unit's rows from their shards and decoding them into batch buffers, and the
three decoders that run that work (threads in this process, worker processes, Ray Data tasks).

"thread": a thread pool in the Train worker; libjpeg-turbo releases the GIL, but the Python around each
decode does not, so threads stop scaling (H200 box, 16 cores, 224: 4.9K img/s with 8 threads, 2.8K with
16). "process": a persistent torch DataLoader whose worker processes decode whole rank batches into
shared memory (same box: 8.6K img/s at 224, 23K at 56 with 16). "auto" picks threads for <= 4 decode
workers, else processes. "ray": the same units as Ray Data map_batches tasks; ~0.3x the thread backend
on the 2-core dev machine (per-task and object-store overhead), so it is opt-in. Figures:
benchmarks/bench_decode_scaling.py, bench_input.py.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ray_mmd import storage
from ray_mmd.data.cache import ShardCache
from ray_mmd.data.manifest import ShardInfo
from ray_mmd.data.shards import ShardTables
from ray_mmd.data.transforms import KEYS, alloc_wire, decode_into

Spec = tuple[np.ndarray, np.ndarray]  # (sample ids, their shard index) of one decode unit


def decode_unit(
    tables: ShardTables,
    root: str,
    shards: dict[int, ShardInfo],
    ids: np.ndarray,
    sidx: np.ndarray,
    size: int,
    lib: str,
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
        table = tables.read(storage.join(root, shard.path), shard)
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


@dataclass
class Source:
    """Where a decoder reads: the dataset root, its shards by index, the stage size, the JPEG library,
    the wire shapes of a batch and the node-local shard cache settings."""

    root: str
    shards: dict[int, ShardInfo]
    size: int
    lib: str
    shapes: dict[str, tuple[int, int]]
    cache_dir: str | None
    cache_bytes: int

    def tables(self) -> ShardTables:
        """Shard tables for a reader in another process (its own cache handle and table bound)."""
        return ShardTables(ShardCache(self.cache_dir, self.cache_bytes) if self.cache_dir else None)

    def decode(self, tables: ShardTables, spec: Spec, shared: bool = False) -> dict:
        """One unit decoded into freshly allocated wire buffers (in shared memory if `shared`)."""
        ids, sidx = spec
        into = alloc_wire(len(ids), self.shapes, shared=shared)
        meta = decode_unit(
            tables,
            self.root,
            self.shards,
            ids,
            sidx,
            self.size,
            self.lib,
            {k: v.numpy() for k, v in into.items()},
        )
        return {**into, "bg_id": meta["bg_id"], "reason": meta["reason"]}


class Decoder:
    """The interface: how big a decode unit is, and who decodes it. A decoder that is `offloaded`
    decodes rows elsewhere and hands them back in plan order (`decode`); one that is not fills the
    batch buffers in this process, on the pool `executor` gives for one pass over an epoch."""

    offloaded = False
    zero_copy = False  # a unit covering a whole batch arrives in memory that can become the batch

    def __init__(self, workers: int, unit_samples: int) -> None:
        self.workers, self.unit_samples = workers, unit_samples

    def unit_size(self, n_r: int) -> int:
        """Samples per decode unit, for rank batches of n_r samples."""
        raise NotImplementedError

    def executor(self) -> ThreadPoolExecutor | None:
        return None

    def decode(self, specs: list[Spec]) -> Iterator[dict]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ThreadDecoder(Decoder):
    """Units decode on a thread pool straight into the batch buffers: at most unit_samples a unit and
    at least one unit per thread (so the first and last batch use every thread)."""

    def unit_size(self, n_r: int) -> int:
        return min(self.unit_samples, -(-n_r // self.workers))

    def executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix="decode")


class _UnitDataset(torch.utils.data.Dataset):
    """DataLoader "indices" are decode units (ids, sidx). A worker process reads the rows from its
    shards and decodes them into shared memory, which reaches the trainer without a copy."""

    def __init__(self, src: Source) -> None:
        self.src = src
        self._tables: ShardTables | None = None  # made in the worker process, on first use

    def __getitem__(self, spec: Spec) -> dict:
        if self._tables is None:
            self._tables = self.src.tables()
        return self.src.decode(self._tables, spec, shared=True)


class _Specs(torch.utils.data.Sampler):
    """The process decoder's sampler: this pass's decode units, set before each pass."""

    def __init__(self) -> None:
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class ProcessDecoder(Decoder):
    """A persistent torch DataLoader whose worker processes decode whole rank batches (handing over a
    unit costs ~ms; many batches are in flight)."""

    offloaded = True
    zero_copy = True

    def __init__(self, src: Source, workers: int, unit_samples: int) -> None:
        super().__init__(workers, unit_samples)
        self.src = src
        self._loader: torch.utils.data.DataLoader | None = None

    def unit_size(self, n_r: int) -> int:
        return n_r

    def decode(self, specs: list[Spec]) -> Iterator[dict]:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                _UnitDataset(self.src),
                batch_size=None,
                sampler=_Specs(),
                num_workers=self.workers,
                # forked once per stream (as DataLoaders in Ray Train workers usually are); a worker
                # touches only its own shard tables and cache, never this process's threads or CUDA
                persistent_workers=True,
                prefetch_factor=2,
            )
        self._loader.sampler.items = specs
        return iter(self._loader)

    def close(self) -> None:
        if self._loader is not None:
            it = getattr(self._loader, "_iterator", None)
            if it is not None:
                it._shutdown_workers()
            self._loader = None


# Ray Data tasks reuse worker processes: the shard tables of each such process, by cache setting, so a
# task that lands where the previous one read its shard does not read it again.
_TASK_TABLES: dict[tuple, ShardTables] = {}


def _ray_decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: one planned unit in, its decoded rows (one per sample) out."""
    src, spec = pickle.loads(batch["spec"][0])
    key = (src.cache_dir, src.cache_bytes)
    if key not in _TASK_TABLES:
        _TASK_TABLES[key] = src.tables()
    out = src.decode(_TASK_TABLES[key], spec)
    return {
        **{k: out[k].numpy() for k in KEYS},
        "bg_id": out["bg_id"],
        "reason": np.array(out["reason"], str),
    }


class RayDecoder(Decoder):
    """Units (4x unit_samples) as Ray Data map_batches tasks on this worker's node when it has room."""

    offloaded = True

    def __init__(self, src: Source, workers: int, unit_samples: int, task_cpus: float) -> None:
        super().__init__(workers, unit_samples)
        self.src, self.task_cpus = src, task_cpus

    def unit_size(self, n_r: int) -> int:
        return 4 * self.unit_samples

    def decode(self, specs: list[Spec]) -> Iterator[dict]:
        import ray

        items = []
        for ids, sidx in specs:  # each task gets only the shards its unit touches
            shards = {int(k): self.src.shards[int(k)] for k in np.unique(sidx)}
            src = Source(**{**self.src.__dict__, "shards": shards})
            items.append({"spec": pickle.dumps((src, (ids, sidx)))})
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # batches must come back in plan order
        node = ray.get_runtime_context().get_node_id()
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ray_decode_batch,
            batch_size=1,
            num_cpus=self.task_cpus,
            compute=ray.data.TaskPoolStrategy(size=self.workers),
            # decode on this worker's node, where the batches are consumed; anywhere if it is full
            label_selector={"ray.io/node-id": node},
            fallback_strategy=[{"label_selector": {}}],
        )
        return iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))


def make_decoder(backend: str, src: Source, workers: int, unit_samples: int, task_cpus: float) -> Decoder:
    """The backend setting, resolved once. "auto": threads share the GIL for the Python around each
    decode, so past ~4 workers they stop scaling and processes take over."""
    if backend == "auto":
        backend = "process" if workers > 4 else "thread"
    if backend == "process":
        return ProcessDecoder(src, workers, unit_samples)
    if backend == "ray":
        return RayDecoder(src, workers, unit_samples, task_cpus)
    return ThreadDecoder(workers, unit_samples)
