"""The Ray decoder on a real multi-node Ray cluster (ray.cluster_utils.Cluster, one per module): a
trainer-like node (this process, 1 CPU) and a CPU-only decode node carrying the "decode" resource.
Decoding runs where data.decode_nodes says, keeps the stream's order and exactly-once contract, and
survives the decode node going away mid-epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from ray_mmd.data.decoders import ThreadDecoder
from ray_mmd.data.order import Chunk
from ray_mmd.data.ray_decoder import RayDecoder
from ray_mmd.data.stream import DataStream
from ray_mmd.data.transforms import KEYS
from tests.data.test_stream import _consume_with_restarts, _expected, plans

pytestmark = pytest.mark.slow
SIZE = 32


@pytest.fixture(scope="module")
def packed(packed_factory) -> str:
    return packed_factory(240, 20, seed=1)


@pytest.fixture(scope="module")
def cluster():
    """Head = the trainer's node (1 CPU, no decode resource) + one decode node (1 CPU, decode: 2)."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node = c.add_node(num_cpus=1, resources={"decode": 2})
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    try:
        c.wait_for_nodes()
        yield c, node
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def cfg(packed, stream_cfg):
    def make(**kw):
        base = dict(chunks=[Chunk(10, 230, 2)], image_size=SIZE, global_batch_size=16, seed=3, workers=1)
        return stream_cfg(packed, **{**base, **kw})

    return make


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in (*KEYS, "bg_id", "flip", "sample_id"):
            assert torch.equal(x[k], y[k]), k


def test_auto_decodes_every_unit_on_the_decode_node(cluster, cfg):
    import ray

    _, node = cluster
    here = ray.get_runtime_context().get_node_id()
    ref = DataStream(cfg(backend="thread", decoded_preload_bytes=64 << 20))
    want = [b for _ in range(2) for b in ref.epoch_batches()]
    s = DataStream(cfg(decoded_preload_bytes=64 << 20))  # backend auto, decode_nodes auto
    assert isinstance(s.decoder, RayDecoder) and s.decoder.nodes == "decode"
    assert len(s.decoder._pool()) == 2  # one actor per decode slot (world size 1)
    got = list(s.epoch_batches())
    st1 = s.stats()
    e2 = list(s.epoch_batches())
    got += e2
    st2 = s.stats()
    s.close()
    _same(got, want)  # same batches, same order, as decoding here
    assert st1["remote_nodes"] == {node.node_id: st1["remote_units"]} and node.node_id != here
    assert st1["remote_units"] == len(want) // 2  # one unit per batch (unit_samples 64 > 16)
    # the second epoch comes from the decoded preload, filled from rows decoded on the other node
    new = st2["decoded"] - st1["decoded"]  # only epoch 1's dropped tail is decoded again
    assert new < 16 and st2["preload_hits"] + new == 16 * len(e2)
    assert st2["remote_nodes"] == {node.node_id: st2["remote_units"]}


def test_local_setting_and_thread_backend_stay_off_the_decode_node(cluster, cfg):
    assert isinstance(DataStream(cfg(decode_nodes="local")).decoder, ThreadDecoder)
    s = DataStream(cfg(backend="ray", decode_nodes="local"))
    list(s.epoch_batches())
    import ray

    assert set(s.stats()["remote_nodes"]) == {ray.get_runtime_context().get_node_id()}
    s.close()


def test_local_ray_decoders_start_on_a_node_whose_cpus_the_trainers_hold(cluster, cfg):
    """Train workers usually hold every CPU of their node: local decode actors reserve none, so they still
    start there (reserving some left them pending, and the run stalled for good)."""
    from concurrent.futures import ThreadPoolExecutor

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=1)
    class Trainer:
        def ready(self) -> bool:
            return True

    holder = Trainer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
    try:
        assert ray.get(holder.ready.remote(), timeout=60)
        s = DataStream(cfg(backend="ray", decode_nodes="local", workers=2))
        pool = ThreadPoolExecutor(1)  # a stalled stream fails the test instead of hanging it
        try:
            batches = pool.submit(lambda: list(s.epoch_batches())).result(timeout=60)
        finally:
            pool.shutdown(wait=False)
        assert batches and set(s.stats()["remote_nodes"]) == {here}
        s.close()
    finally:
        ray.kill(holder)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plans)
def test_exactly_once_ray_decoder_across_restarts_and_resizes(cluster, cfg, plan):
    c = cfg(backend="ray", decode_nodes="decode", global_batch_size=24)
    seen, state = _consume_with_restarts(c, plan)
    want, dropped = _expected(c)
    assert sorted(seen) == want  # every sample once: no repeats, none skipped
    assert state["dropped"] == dropped


def test_other_setting_uses_the_cpu_node_that_is_not_this_one(cluster, cfg):
    import ray

    _, node = cluster
    want = list(DataStream(cfg(backend="thread")).epoch_batches())
    s = DataStream(cfg(decode_nodes="other"))  # backend auto: the Ray decoder
    assert isinstance(s.decoder, RayDecoder) and s.decoder.nodes == "other"
    assert len(s.decoder._pool()) == 1  # one actor per CPU of the decode node (its "decode" unused)
    _same(list(s.epoch_batches()), want)
    st_ = s.stats()
    s.close()
    assert (
        st_["remote_nodes"] == {node.node_id: len(want)}
        and node.node_id != ray.get_runtime_context().get_node_id()
    )


def test_two_ranks_split_the_slots_and_share_the_decoded_preload(cluster, cfg):
    """World size 2: each rank gets one of the 2 decode slots, both decode on the decode node, and in
    epoch 2 a rank is served the rows either rank decoded there (the object-store preload)."""
    _, node = cluster
    pre = dict(decoded_preload_bytes=64 << 20)
    ref = DataStream(cfg(backend="thread", **pre))
    want = [b for _ in range(2) for b in ref.epoch_batches()]
    conf = cfg(decode_nodes="decode", preload_shared=True, preload_group="t-remote-shared", **pre)
    ranks = [DataStream(conf, r, 2) for r in range(2)]
    assert [len(r.decoder._pool()) for r in ranks] == [1, 1]
    got: list[list[dict]] = [[], []]
    seen, counts = [], []
    for _ in range(2):
        before = [r.stats() for r in ranks]
        parts = [list(r.epoch_batches()) for r in ranks]  # rank 0's whole epoch, then rank 1's
        for r, p in enumerate(parts):
            got[r] += p
        seen.append([{int(i) for b in p for i in b["sample_id"]} for p in parts])
        counts.append(
            [
                {k: r.stats()[k] - b[k] for k in ("decoded", "preload_hits")}
                for r, b in zip(ranks, before, strict=True)
            ]
        )
    stats = [r.stats() for r in ranks]
    for r in ranks:
        r.close()
    _same([{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(*got, strict=True)], want)
    for st_ in stats:  # every unit of both ranks decoded on the decode node
        assert st_["remote_nodes"] == {node.node_id: st_["remote_units"]} and st_["remote_units"] > 0
    (a0, a1), (b0, b1) = seen
    assert not a0 & a1 and counts[0][0] == {"decoded": len(a0), "preload_hits": 0}
    # epoch 2: rank 0 is served every id either rank decoded in epoch 1, not only its own
    assert b0 & a1 and counts[1][0]["preload_hits"] == len(b0 & (a0 | a1)) > len(b0 & a0)
    assert counts[1][0]["decoded"] == len(b0 - (a0 | a1))
    assert counts[1][1]["preload_hits"] == len(b1 & (a0 | a1 | b0))


def test_decode_node_removed_mid_epoch(cluster, cfg):
    """Every unit yielded once, in order: the dead actors' units are decoded again elsewhere."""
    import ray

    c, node = cluster
    here = ray.get_runtime_context().get_node_id()
    # small batches: many units still undecoded when the node goes (the assembler runs ~33 ahead)
    one = dict(chunks=[Chunk(10, 230, 1)], global_batch_size=4)
    conf = cfg(backend="ray", decode_nodes="decode", **one)
    want = list(DataStream(cfg(backend="thread", **one)).epoch_batches())
    s = DataStream(conf)
    g = s.epoch_batches()
    got = [next(g) for _ in range(3)]
    c.remove_node(node, allow_graceful=False)
    # a lost VM takes its processes with it; here an actor's worker process can outlive its raylet
    # for a while and keep serving direct actor calls, so end them as the VM's loss would
    for a in list(s.decoder._actors):
        ray.kill(a)
    got += list(g)
    st_ = s.stats()
    s.close()
    _same(got, want)
    ids = np.concatenate([b["sample_id"].numpy() for b in got])
    assert len(ids) == len(set(ids.tolist()))
    assert st_["remote_retries"] >= 1 and st_["remote_nodes"].get(here, 0) >= 1
    assert sum(st_["remote_nodes"].values()) == st_["remote_units"] == len(want)
