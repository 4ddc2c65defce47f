"""DeviceFeed over a real DataStream: same batches as preparing them in place, a position that matches
what was yielded (exactly-once across a resume while batches were in flight), early close; on CUDA the
side-stream batches equal the serial ones."""

from __future__ import annotations

import pytest
import torch

from ray_mmd.data.device_feed import DeviceFeed
from ray_mmd.data.order import Chunk
from ray_mmd.data.stream import DataStream, StreamConfig
from ray_mmd.train.step import AmpPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packed(packed_factory) -> str:
    return packed_factory(160, 6, seed=2)


def _cfg(url: str, **kw) -> StreamConfig:
    base = dict(chunks=[Chunk(0, 160, 2)], image_size=32, global_batch_size=16, seed=1, workers=2)
    return StreamConfig.for_url(url, **{**base, **kw})


def _prep(stream: DataStream, device: str = "cpu"):
    policy, fin = AmpPolicy.for_device(device, "fp32"), stream.finisher()
    return lambda w: policy.prepare_batch(w, fin)


def test_cpu_default_is_a_pass_through_with_the_same_batches(packed):
    a, b = DataStream(_cfg(packed)), DataStream(_cfg(packed))
    feed = DeviceFeed(a.epoch_batches(), _prep(a), "cpu", state=a.state_dict)
    assert feed.depth == 0
    direct = [_prep(b)(w) for w in b.epoch_batches()]
    got = list(feed)
    assert len(got) == len(direct) > 3
    for g, d in zip(got, direct, strict=True):
        for k in ("x", "mask", "depth", "sample_id"):
            assert torch.equal(g[k], d[k])
    assert feed.state_dict() == a.state_dict() == b.state_dict()


@pytest.mark.parametrize("depth,thread", [(0, False), (1, False), (3, False), (2, True)])
def test_position_is_that_of_the_last_yielded_batch_and_resume_is_exactly_once(packed, depth, thread):
    s = DataStream(_cfg(packed))
    feed = DeviceFeed(s.epoch_batches(), _prep(s), "cpu", depth=depth, state=s.state_dict, thread=thread)
    seen: list[int] = []
    for i, b in enumerate(feed):
        seen += b["sample_id"].tolist()
        assert feed.state_dict()["consumed"] == (i + 1) * 16
        if i == 2:
            # the stream itself is `depth` batches further (the producer thread: up to depth + 1, by
            # timing): checkpointing it would skip those
            assert s.state_dict()["consumed"] >= (3 + (0 if thread else depth)) * 16
            saved = feed.state_dict()
            break
    r = DataStream(_cfg(packed))
    r.load_state_dict(saved)
    rest = DeviceFeed(r.epoch_batches(), _prep(r), "cpu", depth=depth, state=r.state_dict, thread=thread)
    seen += [i for b in rest for i in b["sample_id"].tolist()]
    full = DataStream(_cfg(packed))
    want = [i for w in full.epoch_batches() for i in w["sample_id"].tolist()]
    assert seen == want  # every sample of the epoch once, in the uninterrupted order
    assert rest.state_dict() == full.state_dict() and rest.state_dict()["epoch"] == 1


@pytest.mark.parametrize("thread", [False, True])
def test_early_close_stops_the_stream_and_it_stays_usable(packed, thread):
    s = DataStream(_cfg(packed))
    feed = DeviceFeed(s.epoch_batches(), _prep(s), "cpu", depth=2, state=s.state_dict, thread=thread)
    it = iter(feed)
    next(it)
    it.close()
    assert feed.state_dict()["consumed"] == 16
    s.load_state_dict(feed.state_dict())
    assert sum(len(w["sample_id"]) for w in s.epoch_batches()) == (s.steps_in_epoch() - 1) * 16


def test_thread_mode_same_batches_and_errors_reach_the_consumer(packed):
    a, b = DataStream(_cfg(packed)), DataStream(_cfg(packed))
    got = list(DeviceFeed(a.epoch_batches(), _prep(a), "cpu", depth=2, thread=True))
    want = [_prep(b)(w) for w in b.epoch_batches()]
    assert len(got) == len(want) and all(
        torch.equal(g[k], w[k]) for g, w in zip(got, want, strict=True) for k in ("x", "sample_id")
    )

    def broken():
        yield {"n": 1}
        raise OSError("shard went away")

    with pytest.raises(OSError, match="shard went away"):
        list(DeviceFeed(broken(), lambda w: w, "cpu", depth=2, thread=True))


def test_bad_depth():
    with pytest.raises(ValueError):
        DeviceFeed([], lambda w: w, "cpu", depth=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in benchmarks/gpu_suite.sh)")
def test_cuda_side_stream_batches_equal_serial_ones_under_load(packed):
    s = DataStream(_cfg(packed, chunks=[Chunk(0, 160, 1)]))
    wires = list(s.epoch_batches())
    prep = _prep(s, "cuda")
    serial = [{k: v.clone() for k, v in prep(w).items()} for w in wires]
    big = torch.randn(4096, 4096, device="cuda")
    for thread in (False, True, False):  # the consumer keeps the main stream busy, then reads and frees
        for got, want in zip(DeviceFeed(wires, prep, "cuda", depth=2, thread=thread), serial, strict=True):
            big = (big @ big).tanh_()
            for k in ("x", "mask", "depth", "sample_id"):
                assert torch.equal(got[k], want[k])
    torch.cuda.synchronize()
