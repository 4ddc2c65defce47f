"""The "ray" decoder: long-lived Ray decode actors, placed by data.decode_nodes (this node, nodes with the
"decode" resource, or other CPU-only nodes) and shared by the streams of a process. Units for a
consumer on the same node are decoded into /dev/shm slots the consumer lends (no object-store copy);
units from other nodes come through the object store. Figures: benchmarks/bench_ray_data.py."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import mmap
import os
import sys
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ray_mmd.data.cache import ShardCache
from ray_mmd.data.decoders import Decoder, Source, Spec, decode_unit
from ray_mmd.data.shards import ShardTables
from ray_mmd.data.transforms import KEYS
from ray_mmd.data.unit_slots import SHM, UnitSlots, map_slot, sweep_unit_files, unit_bytes, wire_views


class _DecodeActor:
    """A long-lived Ray decode worker, shared by the streams of one process (each registers its Source
    once with `add`): keeps its shard tables (and node-local cache) across units, passes and streams.

    A unit for a consumer on this node is decoded straight into a slot file the consumer lent it under
    /dev/shm (both map it once and keep it: no page faults, nothing through the object store); for a
    consumer on another node its rows come back as uint8 numpy arrays through the object store (one
    copy into it here; the consumer maps them read-only)."""

    def __init__(self, cache_dir: str | None, cache_bytes: int) -> None:
        import ray

        self.tables = ShardTables(ShardCache(cache_dir, cache_bytes) if cache_dir else None)
        self.node = ray.get_runtime_context().get_node_id()
        self.sources: dict[int, Source] = {}
        self.maps: dict[str, mmap.mmap] = {}

    def add(self, sid: int, src: Source) -> None:
        self.sources[sid] = src

    def forget(self, sid: int | None, paths: list[str]) -> None:
        """A stream let go: drop its Source and the slot files it unlinked."""
        self.sources.pop(sid, None)
        for p in paths:
            mm = self.maps.pop(p, None)
            if mm is not None:
                with contextlib.suppress(BufferError):
                    mm.close()

    def decode(
        self, sid: int, ids: np.ndarray, sidx: np.ndarray, slot: tuple[str, int] | None, here: str
    ) -> dict:
        src = self.sources[sid]
        if slot is not None and here == self.node:
            path, size = slot
            mm = self.maps.get(path)
            if mm is None:
                try:
                    mm = self.maps[path] = map_slot(path, size)
                except FileNotFoundError:  # the consumer closed the pass meanwhile: nobody waits
                    mm = None
            if mm is not None:
                into = wire_views(mm, len(ids), src.shapes)
                meta = decode_unit(self.tables, src.root, src.shards, ids, sidx, src.size, src.lib, into)
                return {**meta, "node": self.node, "shm": True}
        out = src.decode(self.tables, (ids, sidx))
        return {
            **{k: out[k].numpy() for k in KEYS},
            "bg_id": out["bg_id"],
            "reason": out["reason"],
            "node": self.node,
            "shm": False,
        }


def _placement(nodes: str, workers: int, world_size: int, task_cpus: float) -> list[dict]:
    """Actor options, one per decode actor of this rank. decode: the "decode" resource is the slot
    count, split evenly between ranks; other: one actor per CPU of each live CPU node that has no GPU
    and is not this one, split between ranks (hard affinity); local (or nothing found): `workers`
    actors on this node."""
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
    # decode where the batches are consumed: hard affinity (a 0-CPU actor with a soft one may land on any
    # node). No CPUs reserved by default (StreamConfig.ray_task_cpus): the Train workers (and a fallback's
    # other streams, e.g. the evaluation's) may hold them all, and a pending actor would wait forever
    this_node = NodeAffinitySchedulingStrategy(here, soft=False)
    return [{"num_cpus": task_cpus if nodes == "local" else 0, "scheduling_strategy": this_node}] * workers


@dataclass
class _Slot:
    """One decode actor of a pool: its handle, units queued on it, its node (known from its first
    result) and the sources it has been sent."""

    actor: object
    busy: int = 0
    node: str | None = None
    sids: set = dataclasses.field(default_factory=set)


class _Pool:
    """Decode actors shared by the RayDecoders of one process that place them alike (the train and
    eval streams of a worker, a stream made again after a restart): started when the first of them is
    built, so actor start-up (a fresh worker importing torch and ray_mmd, ~2 s here) overlaps model
    build, and killed when the last is closed or collected."""

    def __init__(self, key: tuple, nodes: str, workers: int, world_size: int, task_cpus: float) -> None:
        self.key, self.nodes, self.workers, self.world_size, self.task_cpus = (
            key,
            nodes,
            workers,
            world_size,
            task_cpus,
        )
        self.cache_dir, self.cache_bytes = key[-2], key[-1]
        self.slots: list[_Slot] = []
        self.users = 0

    def actors(self) -> list[_Slot]:
        """The live slots, placing the pool (again, after its actors died) when it has none."""
        import ray

        if not self.slots:
            cls = ray.remote(max_restarts=0)(_DecodeActor)
            opts = _placement(self.nodes, self.workers, self.world_size, self.task_cpus)
            self.slots = [_Slot(cls.options(**o).remote(self.cache_dir, self.cache_bytes)) for o in opts]
        return self.slots

    def send(self, slot: _Slot, sid: int, src: Source) -> None:
        """Register a stream's Source with an actor once (calls run in submission order)."""
        if sid not in slot.sids:
            slot.actor.add.remote(sid, src)
            slot.sids.add(sid)

    def drop(self, slot: _Slot) -> None:
        if slot in self.slots:
            self.slots.remove(slot)

    def kill(self) -> None:
        import ray

        for s in self.slots:
            with contextlib.suppress(Exception):  # already gone with its node
                ray.kill(s.actor)
        self.slots = []


_POOLS: dict[tuple, _Pool] = {}
_POOLS_MU = threading.Lock()
_SIDS = itertools.count()


def _release(pool: _Pool) -> None:
    with _POOLS_MU:
        pool.users -= 1
        if pool.users > 0:
            return
        if _POOLS.get(pool.key) is pool:
            del _POOLS[pool.key]
    if sys.modules.get("ray") is not None and sys.modules["ray"].is_initialized():
        pool.kill()


class RayDecoder(Decoder):
    """Units decoded by a pool of long-lived Ray actors (_DecodeActor), placed by data.decode_nodes and
    shared by this process's streams that place them alike (_Pool).

    Why actors and not Ray Data tasks (py-spy, 224 px, 2 cores, 400 samples x 3 epochs: 64 / 873 /
    864 img/s): 68% of all sampled time was Python imports in freshly started Ray workers (ray.data,
    torch, ray_mmd pulled in by unpickling each task's Source), 17% deserialising task arguments, JPEG
    decode ~2%; every pass built a new Dataset and Ray Data's resource budget held it to one running
    task. Actors keep their shard tables and the stream's Source, take (ids, sidx) only.

    Why units for this node go through /dev/shm (py-spy + ray.timeline, 224 px, 2 cores, 2 actors,
    steady state): with the rows returned through the object store each actor spent 14% of its time
    in store_outputs (copying ~21 MB a unit into plasma) and the consumer copied every unit once more
    into its batch, which left Ray at ~0.6x the thread backend. Now an actor on this node decodes into
    a file this process made (no copy, no object store) and a unit that is a whole rank batch becomes
    the batch (zero_copy). Units for other nodes still come through the object store, mapped without a
    copy (those batches are read-only views; nothing here writes into a wire batch).

    Units go to the least busy actor, at most `inflight_bytes` of decoded rows (and 2 units per actor)
    ahead, and come back in plan order. An actor that dies (its node removed or preempted) has its
    units re-submitted to the others; with none left the pool is placed again (falling back to this
    node), so every unit is yielded exactly once, in order."""

    offloaded = True
    zero_copy = True

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
        self.sid = next(_SIDS)
        self._p: _Pool | None = None
        self._release: weakref.finalize | None = None
        self._here: str | None = None
        self._slots: UnitSlots | None = UnitSlots(self.sid) if os.path.isdir(SHM) else None
        self.counters: dict = {"remote_units": 0, "remote_retries": 0, "remote_nodes": {}}
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():  # start the actors now: they warm up meanwhile
            self._start()

    def unit_size(self, n_r: int) -> int:
        return min(n_r, self.unit_samples)

    def _start(self) -> _Pool:
        """This decoder's pool (shared, created if none places alike), its actors placed and sent the
        Source."""
        import ray

        if self._p is None:
            ctx = ray.get_runtime_context()
            self._here = ctx.get_node_id()
            key = (ctx.get_job_id(), self._here, self.nodes, self.workers, self.world_size, self.task_cpus,
                   self.src.cache_dir, self.src.cache_bytes)  # fmt: skip
            with _POOLS_MU:
                pool = _POOLS.get(key)
                if pool is None:
                    pool = _POOLS[key] = _Pool(key, self.nodes, self.workers, self.world_size, self.task_cpus)
                    if self._slots is not None:
                        sweep_unit_files()
                pool.users += 1
            self._p = pool
            self._release = weakref.finalize(self, _release, pool)
        for slot in self._p.actors():
            self._p.send(slot, self.sid, self.src)
        return self._p

    @property
    def _actors(self) -> list:
        """The pool's live actor handles."""
        return [s.actor for s in self._p.slots] if self._p is not None else []

    def _pool(self) -> list:
        return [s.actor for s in self._start().actors()]

    def _submit(self, spec: Spec) -> tuple:
        pool = self._start()
        slot = min(pool.actors(), key=lambda s: s.busy)
        pool.send(slot, self.sid, self.src)
        slot.busy += 1
        buf = None
        if self._slots is not None and slot.node in (None, self._here):  # (None: not known yet)
            buf = self._slots.take(unit_bytes(len(spec[0]), self.src.shapes))
        lend = buf[:2] if buf is not None else None
        return spec, slot.actor.decode.remote(self.sid, *spec, lend, self._here), slot, buf

    def _result(self, item: tuple) -> dict:
        """A unit's rows (tensors over its slot when decoded into one, see UnitSlots)."""
        import ray

        spec, ref, slot, buf = item
        pool = self._start()
        while True:
            try:
                out = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):  # node gone
                self.counters["remote_retries"] += 1
                pool.drop(slot)  # gone: its other units fail too and come back here
                if buf is not None:  # a fresh slot: nothing that might still run writes into it
                    self._slots.retire(buf)
                spec, ref, slot, buf = self._submit(spec)
                continue
            slot.busy -= 1
            slot.node = out["node"]
            self.counters["remote_units"] += 1
            nodes = self.counters["remote_nodes"]
            nodes[out["node"]] = nodes.get(out["node"], 0) + 1
            if out["shm"]:
                rows = self._slots.lend(buf, len(spec[0]), self.src.shapes)
            else:
                if buf is not None:
                    self._slots.give(buf)
                with warnings.catch_warnings():  # object-store rows are read-only views: see the class doc
                    warnings.simplefilter("ignore", UserWarning)
                    rows = {k: torch.from_numpy(out[k]) for k in KEYS}
            return {**rows, "bg_id": out["bg_id"], "reason": out["reason"]}

    def decode(self, specs: list[Spec]) -> Iterator[dict]:
        row = unit_bytes(1, self.src.shapes)
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

            for _, ref, slot, buf in pending:  # a closed pass: queued units are not waited for
                slot.busy -= 1
                with contextlib.suppress(Exception):  # already finished or its actor is gone
                    ray.cancel(ref)
                if buf is not None:
                    self._slots.retire(buf)

    def stats(self) -> dict:
        return dict(self.counters, remote_nodes=dict(self.counters["remote_nodes"]))

    def close(self) -> None:
        """Let go of the pool (its actors stop when no other stream of this process holds it); the
        decoder starts or joins a pool again when used after this."""
        if self._p is not None:
            paths = self._slots.close() if self._slots is not None else []
            for slot in self._p.slots:
                with contextlib.suppress(Exception):  # its node is gone
                    slot.actor.forget.remote(self.sid, paths)
                slot.sids.discard(self.sid)
        if self._release is not None:
            self._release()
        self._p, self._release = None, None
