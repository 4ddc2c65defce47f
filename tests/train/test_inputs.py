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


def test_fed_stream_position_follows_the_step_and_an_early_exit_rewinds_the_stream(
    packed_dataset, monkeypatch
):
    import torch

    from ray_mmd.train.step import AmpPolicy

    monkeypatch.setattr(inputs, "FEED_DEPTH", 2)  # the CUDA read-ahead, forced on the CPU
    cfg = load(None, [f"data.url={packed_dataset}", "data.global_batch_size=16", "data.chunks=[[0,96,1]]"])
    man = mf.load(packed_dataset)
    stream = inputs.build_stream(cfg, man, rank=0, world=1, local_world=1)
    policy, fin = AmpPolicy.for_device("cpu", "fp32"), stream.finisher()
    fed = inputs.FedStream(stream, lambda w: policy.prepare_batch(w, fin), torch.device("cpu"))
    n = stream.steps_left()
    it = fed.epoch()
    ids, batch = next(it)
    assert torch.equal(ids, batch["sample_id"]) and batch["x"].dtype == torch.float32
    assert fed.state_dict()["consumed"] == 16 and stream.state_dict()["consumed"] == 3 * 16  # 2 ahead
    assert fed.steps_left() == n - 1
    it.close()  # the loop left the epoch (e.g. an exception): the stream re-reads what the step did not see
    assert stream.state_dict() == fed.state_dict() and stream.state_dict()["consumed"] == 16
    assert sum(len(i) for i, _ in fed.epoch()) == (n - 1) * 16
