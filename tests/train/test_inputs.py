"""inputs.py: config -> chunk schedule (Chunks) -> StreamConfig; steps of a schedule; the shard cache default."""

from __future__ import annotations

from ray_mmd.config import load
from ray_mmd.data import manifest as mf
from ray_mmd.data.order import Chunk
from ray_mmd.train import inputs


def test_chunk_schedule_and_total_steps(packed_dataset):
    man = mf.load(packed_dataset)
    cfg = load(None, [f"data.url={packed_dataset}", "data.chunks=[[0,96,2],[96,200]]", "data.epochs=3"])
    chunks = inputs.chunk_schedule(cfg, man)
    assert chunks == [Chunk(0, 96, 2), Chunk(96, 200, 3)]
    cfg.data.global_batch_size = 16
    n = [len(man.sample_ids("train", c.lo, c.hi)) // 16 for c in chunks]
    assert inputs.total_steps(cfg, man) == 2 * n[0] + 3 * n[1]
    whole = load(None, [f"data.url={packed_dataset}", "data.epochs=2"])
    assert inputs.chunk_schedule(whole, man) == [Chunk(0, man.id_end, 2)]
    assert inputs.stream_config(cfg, chunks).chunks == chunks


def test_shard_cache_on_by_default_for_remote_data_only():
    assert inputs.shard_cache_dir("auto", "gs://b/packed").endswith("ray_mmd_shard_cache")
    assert inputs.shard_cache_dir("auto", "/data/packed") is None
    assert inputs.shard_cache_dir("/content/cache", "/content/drive/packed") == "/content/cache"
    assert inputs.shard_cache_dir(None, "gs://b/packed") is None
    cfg = load(None, ["data.url=gs://b/packed", "data.backend=process", "data.decode_workers=3"])
    s = inputs.stream_config(cfg, [Chunk(0, 10, 1)])
    assert (s.cache_dir, s.backend, s.workers) == (inputs.shard_cache_dir("auto", "gs://x"), "process", 3)
