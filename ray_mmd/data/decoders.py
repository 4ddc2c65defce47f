"""Who decodes: reading a unit's rows from their shards and decoding them into batch buffers, and the
three decoders that run that work (threads in this process, worker processes, Ray actors that may sit on
other nodes).

"thread": a thread pool in the Train worker; libjpeg-turbo releases the GIL, but the Python around each
decode does not, so threads stop scaling (H200 box, 16 cores, 224: 4.9K img/s with 8 threads, 2.8K with
16). "process": a persistent torch DataLoader whose worker processes decode whole rank batches into
shared memory (same box: 8.6K img/s at 224, 23K at 56 with 16). "ray": long-lived decode actors placed
by data.decode_nodes (this node, nodes with the "decode" resource, or other CPU nodes): the one backend
that decodes on CPUs outside the trainer's node (data/ray_decoder.py). "auto" picks Ray when the cluster has decode nodes,
else threads for <= 4 decode workers and processes above. Figures: benchmarks/bench_decode_scaling.py,
bench_input.py, bench_ray_data.py."""

from __future__ import annotations

import sys
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

    def stats(self) -> dict:
        """Counters the stream reports beside its own (data/*)."""
        return {}

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


def resolve_decode_nodes(setting: str) -> str:
    """data.decode_nodes, resolved: "auto" is "decode" when a live Ray node carries the "decode"
    resource (CPU-only decode nodes were added for this), else "local"."""
    if setting != "auto":
        return setting
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return "local"
    live = [n for n in ray.nodes() if n.get("Alive")]
    return "decode" if any(n["Resources"].get("decode", 0) > 0 for n in live) else "local"


def make_decoder(
    backend: str,
    src: Source,
    workers: int,
    unit_samples: int,
    task_cpus: float,
    decode_nodes: str = "local",
    world_size: int = 1,
) -> Decoder:
    """The backend and decode_nodes settings, resolved once. "auto": decode nodes in the cluster make
    it Ray; else threads share the GIL for the Python around each decode, so past ~4 workers they stop
    scaling and processes take over."""
    nodes = resolve_decode_nodes(decode_nodes)
    if backend == "auto":
        backend = "ray" if nodes in ("decode", "other") else "process" if workers > 4 else "thread"
    if backend == "process":
        return ProcessDecoder(src, workers, unit_samples)
    if backend == "ray":
        from ray_mmd.data.ray_decoder import RayDecoder  # Ray and its slots only for the Ray backend

        return RayDecoder(src, workers, unit_samples, task_cpus, nodes, world_size)
    return ThreadDecoder(workers, unit_samples)
