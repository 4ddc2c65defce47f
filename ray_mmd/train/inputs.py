"""The data wiring of a run: config -> chunk schedule -> StreamConfig -> the rank's DataStream, the feed
that hands the step its device batches (`FedStream`), and the test-split batches of an evaluation. The
stream itself (order, shards, decoding, resume) is ray_mmd.data."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ray_mmd import storage
from ray_mmd.config import TrainConfig
from ray_mmd.data import manifest as mf
from ray_mmd.data.device_feed import DeviceFeed
from ray_mmd.data.order import Chunk
from ray_mmd.data.stream import DataStream, StreamConfig, eval_batches
from ray_mmd.data.transforms import BatchFinisher, make_finisher


def chunk_schedule(cfg: TrainConfig, man: mf.Manifest) -> list[Chunk]:
    """data.chunks ([lo, hi(, epochs)] lists in the config) as Chunks; none = the whole dataset."""
    if cfg.data.chunks:
        return [Chunk(c[0], c[1], c[2] if len(c) > 2 else cfg.data.epochs) for c in cfg.data.chunks]
    return [Chunk(0, man.id_end, cfg.data.epochs)]


def total_steps(cfg: TrainConfig, man: mf.Manifest) -> int:
    """Steps of the whole schedule (remainders smaller than a global batch are dropped)."""
    g = cfg.data.global_batch_size
    return max(
        1, sum(c.epochs * (len(man.sample_ids("train", c.lo, c.hi)) // g) for c in chunk_schedule(cfg, man))
    )


def shard_cache_dir(setting: str | None, data_url: str) -> str | None:
    """data.cache_dir "auto": a node-local cache for remote data, none for data already on local disk."""
    if setting != "auto":
        return setting or None
    if storage.split_url(data_url)[0] == "file":
        return None
    return os.path.join(tempfile.gettempdir(), "ray_mmd_shard_cache")


def stream_config(cfg: TrainConfig, chunks: list[Chunk]) -> StreamConfig:
    """The stage's StreamConfig: the data section as it is, the chunk schedule and the resolved cache dir."""
    d = cfg.data
    return StreamConfig.from_data(
        d,
        list(chunks),
        cache_dir=shard_cache_dir(d.cache_dir, d.url),
        preload_group=f"{cfg.run.name}/stage{cfg.stage}",
    )


def build_stream(cfg: TrainConfig, man: mf.Manifest, rank: int, world: int, local_world: int) -> DataStream:
    """This rank's training stream; the node's cores are shared by its ranks (that many decoders each)."""
    workers = cfg.data.decode_workers or max(1, (os.cpu_count() or 1) // max(1, local_world))
    scfg = dataclasses.replace(stream_config(cfg, chunk_schedule(cfg, man)), workers=workers)
    return DataStream(scfg, rank=rank, world_size=world)


def eval_finisher(cfg: TrainConfig, man: mf.Manifest) -> BatchFinisher:
    """The finisher of the evaluation's wire batches (its own: no flips, the default JPEG library)."""
    return make_finisher(man, cfg.data.image_size)


def eval_wire_batches(cfg: TrainConfig, rank: int, world: int) -> Iterator[dict]:
    """This rank's disjoint slice of the test split (eval.max_samples of it), as wire batches."""
    e = cfg.eval
    return eval_batches(stream_config(cfg, []), rank, world, e.batch_size, max_samples=e.max_samples)


# The feed's read-ahead: None = DeviceFeed's default (2 batches on CUDA, a pass-through on the CPU).
# The producer thread stays off: it was never measured on a GPU (bench_gpu_input --feed-thread would).
# Tests set these to exercise the read-ahead on the CPU.
FEED_DEPTH: int | None = None
FEED_THREAD = False


class FedStream:
    """The stream as the step consumes it: each epoch's wire batches through a DeviceFeed (the next
    batch's copy + finish on a side CUDA stream while the step runs), yielded as (host ids, batch).

    Its `state_dict` is the checkpointed data position (TrainState's "data"): the position after the
    last batch handed to the step, not the stream's read-ahead, so a resume is exactly-once.
    """

    def __init__(self, stream: DataStream, prepare: Callable[[dict], dict], device: torch.device) -> None:
        self.stream, self.prepare, self.device = stream, prepare, device
        self._feed: DeviceFeed | None = None
        self._left = 0

    def epoch(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """The rest of the current (chunk, epoch); the ids stay on the host (no device sync for them)."""
        self._left = self.stream.steps_left()
        feed = DeviceFeed(
            self.stream.epoch_batches(),
            lambda w: (w["sample_id"], self.prepare(w)),
            self.device,
            depth=FEED_DEPTH,
            state=self.stream.state_dict,
            thread=FEED_THREAD,
        )
        self._feed, it = feed, iter(feed)
        try:
            for ids, batch in it:
                self._left -= 1
                yield ids, batch
        finally:
            it.close()  # stops the read-ahead (and its thread) before the position is rewound
            self.stream.load_state_dict(feed.state_dict())  # left early: the stream re-reads the rest
            self._feed = None

    def steps_left(self) -> int:
        """Steps still to come in the current (chunk, epoch), counted from the batches handed out."""
        return self._left if self._feed is not None else self.stream.steps_left()

    def state_dict(self) -> dict:
        return self._feed.state_dict() if self._feed is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
