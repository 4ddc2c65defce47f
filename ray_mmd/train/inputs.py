"""The data wiring of a run: config -> chunk schedule -> StreamConfig -> the rank's DataStream, and the
test-split batches of an evaluation. The stream itself (order, shards, decoding, resume) is ray_mmd.data."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator

from ray_mmd import storage
from ray_mmd.config import TrainConfig
from ray_mmd.data import manifest as mf
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
