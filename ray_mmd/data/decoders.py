"""Who decodes: reading a unit's rows from their shards and decoding them into batch buffers, and the
three decoders that run that work (threads in this process, worker processes, Ray actors that may sit on
other nodes).

"thread": a thread pool in the Train worker; libjpeg-turbo releases the GIL, but the Python around each
decode does not, so threads stop scaling (H200 box, 16 cores, 224: 4.9K img/s with 8 threads, 2.8K with
16). "process": a persistent torch DataLoader whose worker processes decode whole rank batches into
shared memory (same box: 8.6K img/s at 224, 23K at 56 with 16). "ray": long-lived decode actors placed
by data.decode_nodes (this node, nodes with the "decode" resource, or other CPU nodes): the one backend
that decodes on CPUs outside the trainer's node. "auto" picks Ray when the cluster has decode nodes,
else threads for <= 4 decode workers and processes above. Figures: benchmarks/bench_decode_scaling.py,
bench_input.py, bench_ray_data.py."""

from __future__ import annotations

import sys
from collections import deque
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


class _DecodeActor:
    """A long-lived Ray decode worker: keeps its shard tables (and node-local cache) across units and
    passes; returns a unit's rows as uint8 numpy arrays, which the object store hands the consumer
    without a copy (read-only views of the stored buffers)."""

    def __init__(self, src: Source) -> None:
        import ray

        self.src, self.tables = src, src.tables()
        self.node = ray.get_runtime_context().get_node_id()

    def decode(self, ids: np.ndarray, sidx: np.ndarray) -> dict:
        out = self.src.decode(self.tables, (ids, sidx))
        return {
            **{k: out[k].numpy() for k in KEYS},
            "bg_id": out["bg_id"],
            "reason": out["reason"],
            "node": self.node,
        }


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


def _placement(nodes: str, workers: int, world_size: int, task_cpus: float) -> list[dict]:
    """Actor options, one per decode actor of this rank. decode: the "decode" resource is the slot
    count, split evenly between ranks; other: one actor per CPU of each live CPU node that has no GPU
    and is not this one, split between ranks (hard affinity); local (or nothing found): `workers`
    actors preferring this node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    live = [n for n in ray.nodes() if n.get("Alive")]
    if nodes == "decode":
        slots = sum(n["Resources"].get("decode", 0) for n in live)
        if slots > 0:
            # the resource only marks the nodes (a token amount): the slot count sets how many actors,
            # so a stream not yet garbage-collected (its actors idle) never blocks the next one
            return [{"num_cpus": 0, "resources": {"decode": 0.001}}] * max(1, int(slots // world_size))
    if nodes == "other":
        out = []
        for n in live:
            cpus, gpus = n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)
            if n["NodeID"] == here or cpus < 1 or gpus > 0:
                continue
            # CPU-only nodes are the decoders'; 0 CPUs reserved so ranks sharing a node never block
            aff = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            out += [{"num_cpus": 0, "scheduling_strategy": aff}] * max(1, int(cpus) // world_size)
        if out:
            return out
    soft = NodeAffinitySchedulingStrategy(here, soft=True)  # decode where the batches are consumed
    # a fallback (the decode/other nodes are gone) reserves no CPUs: the Train workers (and this run's
    # other streams, e.g. the evaluation's) may hold them all, and a pending actor waits forever
    return [{"num_cpus": task_cpus if nodes == "local" else 0, "scheduling_strategy": soft}] * workers


class RayDecoder(Decoder):
    """Units decoded by a pool of long-lived Ray actors (_DecodeActor), placed by data.decode_nodes.

    Why actors and not Ray Data tasks (py-spy, 224 px, 2 cores, 400 samples x 3 epochs: 64 / 873 /
    864 img/s): 68% of all sampled time was Python imports in freshly started Ray workers (ray.data,
    torch, ray_mmd pulled in by unpickling each task's Source), 17% deserialising task arguments, JPEG
    decode ~2%; every pass built a new Dataset and Ray Data's resource budget held it to one running
    task. Actors keep their shard tables, take (ids, sidx) only, and return numpy buffers the object store
    maps into this process. Units go to the least busy actor, at most `inflight_bytes` of decoded rows
    (and 2 units per actor) ahead, and come back in plan order. An actor that dies (its node removed
    or preempted) has its units re-submitted to the others; with none left the pool is placed again
    (falling back to this node), so every unit is yielded exactly once, in order."""

    offloaded = True

    def __init__(
        self,
        src: Source,
        workers: int,
        unit_samples: int,
        task_cpus: float,
        nodes: str = "local",
        world_size: int = 1,
        inflight_bytes: int = 256 << 20,
    ) -> None:
        super().__init__(workers, unit_samples)
        self.src, self.task_cpus, self.nodes, self.world_size = src, task_cpus, nodes, world_size
        self.inflight_bytes = inflight_bytes
        self._actors: list = []
        self._busy: list[int] = []
        self.counters: dict = {"remote_units": 0, "remote_retries": 0, "remote_nodes": {}}

    def unit_size(self, n_r: int) -> int:
        return min(n_r, self.unit_samples)

    def _pool(self) -> list:
        import ray

        if not self._actors:
            cls = ray.remote(max_restarts=0)(_DecodeActor)
            opts = _placement(self.nodes, self.workers, self.world_size, self.task_cpus)
            self._actors = [cls.options(**o).remote(self.src) for o in opts]
            self._busy = [0] * len(self._actors)
        return self._actors

    def _submit(self, spec: Spec) -> tuple:
        actors = self._pool()
        a = min(range(len(actors)), key=self._busy.__getitem__)
        self._busy[a] += 1
        return spec, actors[a].decode.remote(*spec), actors[a]

    def _result(self, item: tuple) -> dict:
        import ray

        spec, ref, actor = item
        while True:
            try:
                out = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):  # node gone
                self.counters["remote_retries"] += 1
                if actor in self._actors:  # gone: its other units fail too and come back here
                    i = self._actors.index(actor)
                    del self._actors[i], self._busy[i]
                spec, ref, actor = self._submit(spec)
                continue
            if actor in self._actors:
                self._busy[self._actors.index(actor)] -= 1
            self.counters["remote_units"] += 1
            nodes = self.counters["remote_nodes"]
            nodes[out["node"]] = nodes.get(out["node"], 0) + 1
            return out

    def decode(self, specs: list[Spec]) -> Iterator[dict]:
        row = sum(h * w * (3 if k == "fg_bg" else 1) for k, (h, w) in self.src.shapes.items())
        pending: deque[tuple] = deque()
        i = 0
        try:
            while i < len(specs) or pending:
                cap = min(
                    2 * max(1, len(self._pool())), self.inflight_bytes // max(1, row * len(specs[0][0]))
                )
                while i < len(specs) and len(pending) < max(1, cap):
                    pending.append(self._submit(specs[i]))
                    i += 1
                yield self._result(pending.popleft())
        finally:
            import ray

            for _, ref, actor in pending:  # a closed pass: queued units are not waited for
                if actor in self._actors:
                    self._busy[self._actors.index(actor)] -= 1
                try:
                    ray.cancel(ref)
                except Exception:  # already finished or its actor is gone: nothing to stop
                    pass

    def stats(self) -> dict:
        return dict(self.counters, remote_nodes=dict(self.counters["remote_nodes"]))

    def close(self) -> None:
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors, self._busy = [], []


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
        return RayDecoder(src, workers, unit_samples, task_cpus, nodes, world_size)
    return ThreadDecoder(workers, unit_samples)
