"""The training input stream: wires the epoch order (order.py), the shard tables (shards.py) and a decoder
(decoders.py, ray_decoder.py) into this rank's batches, and owns the resumable position.

Resume plans the remaining positions only: shards holding no remaining id are never opened and consumed
rows are dropped before decode. Why per-worker streams and not `get_dataset_shard`:
streaming_split(equal=True) drops rows to even the ranks out and has no resumable state in Ray 2.60;
here every rank yields the same number of batches by construction and the position is three integers.

What a batch is. Rank batches leave the host as uint8 "wire" batches at the JPEG's DCT-scaled decode size
(decoded straight into the batch's buffer, no per-sample copies); `finisher()` resizes, flips and
normalises them on the training device, where that costs microseconds (transforms.BatchFinisher).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ray_mmd.config import DataConfig
from ray_mmd.data import manifest as manifest_mod
from ray_mmd.data.assemble import Assembler, Preload
from ray_mmd.data.cache import ShardCache
from ray_mmd.data.decoders import Source, make_decoder
from ray_mmd.data.order import Chunk, Plan, Position, epoch_order, rank_positions, shard_of
from ray_mmd.data.preload import LocalDecoded, SharedDecoded, nbytes
from ray_mmd.data.shards import ShardTables, prefetcher
from ray_mmd.data.transforms import (
    BatchFinisher,
    flip_decisions,
    make_finisher,
    wire_shapes,
)
from ray_mmd.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class StreamConfig:
    """What one stream reads: the user's data section (config.DataConfig, validated there) and what a
    run resolves from it for one stage. Only `chunks` and `split` are part of the order besides the data
    section's seed and shuffle."""

    data: DataConfig
    chunks: list[Chunk] | None = None  # None = one chunk covering the whole dataset, data.epochs times
    split: str = "train"
    cache_dir: str | None = None  # node-local shard cache (resolved: data.cache_dir may say "auto")
    workers: int = 0  # decode threads / processes / Ray actors on this node; 0 = os.cpu_count()
    preload_group: str = ""  # runs with the same group share a decoded preload (the trainer: run/stage)
    # ---- tuning (not part of the order contract except shuffle_window) ----
    shuffle_window: int = 4  # shards whose rows are mixed together (memory ~ this many shard tables)
    unit_samples: int = 64  # samples per decode task
    # CPUs a Ray decode actor on this node reserves: none, like the thread backend; the Train workers
    # usually hold every CPU of their node, and an actor waiting for one would stall the run for good
    ray_task_cpus: float = 0.0
    decoder: Literal["simplejpeg", "pil"] = "simplejpeg"  # simplejpeg decodes into the batch buffer
    # page-locked batch buffers. Off by default: allocating them cost more than it saved (H200 box:
    # 2.4K vs 8.5K img/s at 224), and the uint8 batches are small enough for pageable copies
    pin_memory: bool = False
    preload_shared: bool | None = None  # decoded preload in the object store for all ranks; None = auto

    @classmethod
    def from_data(
        cls, d: DataConfig, chunks: list[Chunk] | None, cache_dir: str | None, preload_group: str = ""
    ) -> StreamConfig:
        """A stage's stream: the data section as it is, its chunk schedule and the resolved cache dir."""
        return cls(d, chunks, cache_dir=cache_dir, workers=d.decode_workers, preload_group=preload_group)

    @classmethod
    def for_url(cls, url: str, **kw) -> StreamConfig:
        """A stream of `url` outside a run (benchmarks, tools): keywords naming a DataConfig field go to
        the data section, the rest to the stream (chunks, workers, cache_dir, decoder, ...)."""
        fields = {f.name for f in dataclasses.fields(DataConfig)} - {f.name for f in dataclasses.fields(cls)}
        data = DataConfig(url=url, **{k: v for k, v in kw.items() if k in fields})
        return cls(data, **{k: v for k, v in kw.items() if k not in fields})

    def with_data(self, **changes) -> StreamConfig:
        """This config with some data-section values changed."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **changes))

    # read-only views of the data section that callers use on their own
    @property
    def image_size(self) -> int:
        return self.data.image_size

    @property
    def global_batch_size(self) -> int:
        return self.data.global_batch_size

    @property
    def backend(self) -> str:
        return self.data.backend


class DataStream:
    """This rank's view of the chunk schedule; owns the resumable position (see module docstring)."""

    def __init__(self, cfg: StreamConfig, rank: int = 0, world_size: int = 1) -> None:
        d = cfg.data
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if d.global_batch_size < world_size:
            raise UserError(
                f"global_batch_size={d.global_batch_size} is smaller than the {world_size} workers: raise it"
            )
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.man = manifest_mod.load(d.url)
        self.chunks = list(cfg.chunks or [Chunk(0, self.man.id_end, d.epochs)])
        fingerprint = {
            "split": cfg.split,
            "seed": d.seed,
            "shuffle": d.shuffle,
            "shuffle_window": cfg.shuffle_window,
        }
        self._pos = Position(self.chunks, d.global_batch_size, fingerprint)
        self._order_key: tuple | None = None
        self._order: tuple[np.ndarray, np.ndarray] | None = None
        self.cache = ShardCache(cfg.cache_dir, d.cache_bytes) if cfg.cache_dir else None
        self.tables = ShardTables(self.cache)
        self._shards = dict(enumerate(self.man.shards))
        self._lib = cfg.decoder
        # batch buffer shapes: decode size, or the stage size when decoded preload keeps samples
        self._shapes = wire_shapes(self.man.sizes, d.image_size, d.decoded_preload_bytes > 0)
        src = Source(
            self.man.root, self._shards, d.image_size, self._lib, self._shapes, cfg.cache_dir, d.cache_bytes
        )
        workers = cfg.workers or os.cpu_count() or 2
        self.decoder = make_decoder(
            d.backend, src, workers, cfg.unit_samples, cfg.ray_task_cpus, d.decode_nodes, world_size
        )
        self._assembler = Assembler(
            self.man, self.tables, self.decoder, self._shapes, d.image_size, self._lib, cfg.unit_samples,
            cfg.pin_memory, self._add,
        )  # fmt: skip
        self._preloaded: tuple[tuple, Preload] | None = None  # one chunk's decoded samples at a time
        self._quarantine: list[dict] = []
        self._mu = threading.Lock()
        self._counts = {"samples": 0, "dropped": 0, "quarantined": 0, "decoded": 0, "preload_hits": 0}

    # ---- position ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self._pos.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._pos.load_state_dict(state)

    @property
    def done(self) -> bool:
        return self._pos.done

    @property
    def position(self) -> tuple[int, int, int]:
        return self._pos.as_tuple()

    def order(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, shard index of each) of the current (chunk, epoch), in training order."""
        ci, ep, _ = self.position
        if self._order_key != (ci, ep):
            c, d = self.cfg, self.cfg.data
            self._order = epoch_order(
                self.man, self.chunks[ci], ci, ep, c.split, d.seed, d.shuffle, c.shuffle_window
            )
            self._order_key = (ci, ep)
        assert self._order is not None
        return self._order

    def steps_in_epoch(self) -> int:
        """Full global batches of the current (chunk, epoch) in total (not only those left); 0 when done."""
        return 0 if self.done else len(self.order()[0]) // self.cfg.data.global_batch_size

    def steps_left(self) -> int:
        """Full global batches still to come in the current (chunk, epoch)."""
        if self.done:
            return 0
        return (len(self.order()[0]) - self._pos.consumed) // self.cfg.data.global_batch_size

    def _advance(self, n_total: int) -> None:
        self._counts["dropped"] += self._pos.advance(n_total)

    def close(self) -> None:
        """Stop background shard prefetches (waits for running downloads) and decode worker processes.
        The stream stays usable."""
        if self.cache is not None:
            self.cache.close()
        self.decoder.close()

    def stats(self) -> dict:
        out = dict(self._counts)
        out["dropped_total"] = self._pos.dropped
        out["shards_opened"] = self.tables.opens
        out["quarantine"] = list(self._quarantine[:100])
        out.update(self.decoder.stats())  # remote decoders: units, retries, units per node id
        if self.cache is not None:
            out.update({f"cache_{k}": v for k, v in self.cache.counters.items()})
        return out

    def finisher(self) -> BatchFinisher:
        """Turns this stream's wire batches into model tensors on the batch's device (see transforms)."""
        return make_finisher(self.man, self.cfg.data.image_size, self._lib)

    def model_batches(self, device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
        """epoch_batches() finished on `device`: x n×6×S×S, mask/depth n×1×S×S, sample_id."""
        fin = self.finisher().to(device)
        for b in self.epoch_batches():
            yield fin({k: v.to(device, non_blocking=True) for k, v in b.items()})

    # ---- batches -----------------------------------------------------------------------------

    def epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's slice of each remaining global batch of the current (chunk, epoch), in order,
        as wire batches (uint8 at decode size + bg_id + flip + sample_id; `finisher()` makes model
        tensors of them on the training device).

        Yielding batch k marks it consumed. When exhausted the position moves to the next
        (chunk, epoch); a final remainder smaller than a global batch is dropped and counted.
        """
        if self.done:
            return
        d = self.cfg.data
        ci, ep, consumed0 = self.position
        ids, sidx = self.order()
        G, W = d.global_batch_size, self.world_size
        nb = max(0, (len(ids) - consumed0) // G)
        if nb == 0:
            self._advance(len(ids))
            return
        pos = rank_positions(consumed0, nb, G, self.rank, W)
        n_r = len(pos) // nb
        my_ids, my_sidx = ids[pos], sidx[pos]
        flips = flip_decisions(my_ids, d.flip_p, d.seed, ci, ep)
        pump = prefetcher(self.cache, self.man, self.chunks, ci, my_sidx, n_r)
        pump(0)
        plan = Plan(my_ids, my_sidx, nb, n_r, self.decoder.unit_size(n_r))
        pre = self._preload()
        if pre is not None:
            pre.begin_epoch(expect_hits=ep > 0)
        src = self._assembler.batches(plan, [flips[b * n_r : (b + 1) * n_r] for b in range(nb)], pre)
        n_bad = 0
        try:
            for b, (batch, bad) in enumerate(src):
                pump(b + 1)
                n_bad += len(bad)
                self._record_bad(bad, ci, n_bad, len(ids) // W)
                self._counts["samples"] += len(batch["sample_id"])
                self._pos.consumed = consumed0 + (b + 1) * G
                yield batch
        finally:
            src.close()
        self._advance(len(ids))

    def batches_of(self, ids: np.ndarray, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Wire batches of exactly these sample ids, in order, `batch_size` at a time (the last may be
        short), never flipped; the position does not move. Samples that fail to decode are quarantined
        under the same max_bad_fraction, counted over `ids`."""
        sidx = shard_of(self.man, ids)
        plan, flips = [], []
        for i in range(0, len(ids), batch_size):
            n = min(batch_size, len(ids) - i)
            plan.append(Plan(ids[i : i + n], sidx[i : i + n], 1, n, self.decoder.unit_size(n))[0])
            flips.append(np.zeros(n, bool))
        n_bad = 0
        for batch, bad in self._assembler.batches(plan, flips, None):
            n_bad += len(bad)
            self._record_bad(bad, -1, n_bad, len(ids))
            yield batch

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
        limit = self.cfg.data.max_bad_fraction
        if bad_in_epoch > limit * max(1, share):
            q = bad[0]
            raise UserError(
                f"{bad_in_epoch} of this rank's {share} samples of chunk {ci} failed to decode, more than "
                f"max_bad_fraction={limit} (e.g. sample {q['sample_id']}: {q['reason']}); "
                "re-pack the dataset or raise max_bad_fraction"
            )

    def _shared_preload(self) -> bool:
        """Share decoded samples between ranks through the object store (auto: under Ray, with W > 1)."""
        if self.cfg.preload_shared is not None:
            return self.cfg.preload_shared
        ray = sys.modules.get("ray")
        return self.world_size > 1 and ray is not None and ray.is_initialized()

    def _preload(self) -> Preload | None:
        """The current chunk's decoded preload, when it fits in decoded_preload_bytes."""
        c, d = self.cfg, self.cfg.data
        if d.decoded_preload_bytes <= 0:
            return None
        chunk = self.chunks[self._pos.chunk_index]
        key = (self.man.root, c.split, chunk.lo, chunk.hi, d.image_size, c.preload_group)
        if self._preloaded is None or self._preloaded[0] != key:
            ids = self.man.sample_ids(c.split, chunk.lo, chunk.hi)
            if nbytes(len(ids), d.image_size) > d.decoded_preload_bytes:
                return None
            self._drop_preload()
            pre = SharedDecoded(key, ids) if self._shared_preload() else LocalDecoded(ids, self._shapes)
            self._preloaded = (key, pre)
        return self._preloaded[1]

    def _drop_preload(self) -> None:
        """Forget the decoded preload (a shared one is freed once no rank holds it)."""
        if self._preloaded is not None and isinstance(self._preloaded[1], SharedDecoded):
            self._preloaded[1].close()
        self._preloaded = None

    def _add(self, k: str, n: int) -> None:
        with self._mu:
            self._counts[k] += n


# ---- evaluation -----------------------------------------------------------------------------------


def eval_batches(
    cfg: StreamConfig, rank: int, world_size: int, batch_size: int, max_samples: int | None = None
) -> Iterator[dict]:
    """Test-split batches (whole dataset, no shuffle or flip); rank r gets a disjoint contiguous slice.

    The last batch of a rank may be short; ranks may differ by one batch.
    """
    stream = DataStream(cfg.with_data(shuffle=False, flip_p=0.0, decoded_preload_bytes=0), rank, world_size)
    ids = stream.man.sample_ids("test")
    if max_samples is not None:
        ids = ids[:max_samples]
    ids = ids[rank * len(ids) // world_size : (rank + 1) * len(ids) // world_size]
    yield from stream.batches_of(ids, batch_size)
