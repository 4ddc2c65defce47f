"""A training run (trainer.fit, Ray Train) whose input is decoded on another node, on a real multi-node
Ray (ray.cluster_utils.Cluster, one per module): a "GPU-like" trainer node (the head: it carries the
`trainer` resource every Train worker asks for, as a GPU run's workers ask for a GPU) and a CPU-only
decode node (custom resource `decode`).

- data.decode_nodes=auto finds the decode node: every decode unit of the run is decoded there (the
  counters reach metrics.jsonl with the node ids), and every sample is trained exactly once;
- two ranks both decode on the decode node, the global batch is trained exactly once, and the decoded
  preload shared through the object store serves the second epoch (that the ranks split the decode
  slots is asserted at the stream level, tests/data/test_ray_decode.py);
- `make chaos`: data.decode_nodes=other puts the actors on the CPU-only node that is not the
  trainer's; the decode node lost mid-run: training falls back and goes on, exactly once.
Exactly-once is read from the IdLedger in the final checkpoint (debug.record_ids).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ray_mmd.config import load
from ray_mmd.data import manifest as mf
from ray_mmd.train import trainer
from tests.conftest import tiny_overrides
from tests.train.test_chaos import GBS, _check_exactly_once

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """Head = the trainer node (2 CPUs, `trainer`: 2, no decode resource) + a decode node (1 CPU,
    decode: 2). Yields (the cluster, the head's node id, the decode node)."""
    import ray
    from ray.cluster_utils import Cluster

    # fast node-death detection, for the node-loss variant (Ray's own fault-tolerance tests do the same)
    fast = {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 3,
    }
    head = {"num_cpus": 2, "resources": {"trainer": 2}, "_system_config": fast}
    c = Cluster(initialize_head=True, head_node_args=head)
    node = c.add_node(num_cpus=1, resources={"decode": 2})
    try:
        ray.init(address=c.address, log_to_driver=False)
        c.wait_for_nodes()
        yield c, ray.get_runtime_context().get_node_id(), node
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def on_trainer_node(monkeypatch):
    """Train workers ask for the trainer node's resource (build_trainer's resources_per_worker, which a
    sweep uses for GPU fractions), so they never land on the decode node's CPU."""
    build = trainer.build_trainer

    def pinned(cfg, **kw):
        return build(cfg, **{**kw, "resources_per_worker": {"CPU": 1, "trainer": 1}})

    monkeypatch.setattr(trainer, "build_trainer", pinned)


def _fit(packed: str, storage: Path, name: str, *extra: str):
    cfg = load(
        None,
        tiny_overrides(
            packed,
            storage,
            name,
            f"data.global_batch_size={GBS}",
            "data.chunks=[[0,96,2]]",
            "debug.record_ids=true",
            "run.max_failures=0",
            *extra,
        ),
    )
    out = trainer.fit(cfg)
    assert out.metrics["reason"] == "final"
    return out


def _data_lines(run: Path) -> list[dict]:
    """The per-epoch data counters (summed over ranks) from the run's metrics.jsonl."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "data"]


def _nodes(line: dict) -> dict[str, float]:
    p = "data/remote_nodes/"
    return {k[len(p) :]: v for k, v in line.items() if k.startswith(p)}


def test_run_decodes_every_unit_on_the_decode_node(cluster, on_trainer_node, packed_dataset, tmp_path):
    _, head, node = cluster
    decode = node.node_id
    out = _fit(packed_dataset, tmp_path, "auto", "run.workers=1")  # backend and decode_nodes: auto
    _check_exactly_once(tmp_path / "auto", packed_dataset)
    steps = len(mf.load(packed_dataset).sample_ids("train", 0, 96)) // GBS
    lines = _data_lines(tmp_path / "auto")
    assert len(lines) == 2
    for epoch, line in enumerate(lines, start=1):  # counters of the attempt so far
        # one unit per batch (16 rows < unit_samples), none retried, all decoded on the decode node
        assert line["data/remote_units"] == epoch * steps and line["data/remote_retries"] == 0, line
        assert _nodes(line) == {decode: epoch * steps} and decode != head
        assert line["data/decoded"] == line["data/samples"] == epoch * steps * GBS
    assert out.metrics["data/remote_nodes/" + decode] == 2 * steps  # the final report carries them too


def test_two_ranks_decode_on_the_decode_node_and_share_the_decoded_preload(
    cluster, on_trainer_node, packed_dataset, tmp_path
):
    decode = cluster[2].node_id
    _fit(
        packed_dataset,
        tmp_path,
        "two",
        "run.workers=2",
        "data.decode_nodes=decode",
        "data.decoded_preload_bytes=67108864",  # 2 ranks under Ray: the object-store (shared) preload
    )
    _check_exactly_once(tmp_path / "two", packed_dataset)  # over the global batch of both ranks
    steps = len(mf.load(packed_dataset).sample_ids("train", 0, 96)) // GBS
    first, second = _data_lines(tmp_path / "two")
    # epoch 1: each rank decodes one unit per batch (its 8-row slice), all on the decode node
    assert first["data/remote_units"] == 2 * steps and _nodes(first) == {decode: 2 * steps}, first
    assert first["data/decoded"] == first["data/samples"] == steps * GBS
    # epoch 2: rows either rank decoded in epoch 1 come from the shared preload, the rest (epoch 1's
    # dropped remainder, or rows not yet registered) are decoded, again only on the decode node
    hits = second["data/preload_hits"]
    assert hits > 0 and hits + second["data/decoded"] == second["data/samples"] == 2 * steps * GBS
    assert _nodes(second) == {decode: second["data/remote_units"]}, second
    assert second["data/remote_units"] < 4 * steps  # some epoch-2 units were not decoded at all


@pytest.mark.chaos  # ~19 s; `make test` covers "other" at the stream level (tests/data/test_ray_decode.py)
def test_other_places_the_decoders_on_the_cpu_node_that_is_not_the_trainers(
    cluster, on_trainer_node, packed_dataset, tmp_path
):
    _, head, node = cluster
    decode = node.node_id
    _fit(packed_dataset, tmp_path, "other", "run.workers=1", "data.decode_nodes=other")
    _check_exactly_once(tmp_path / "other", packed_dataset)
    line = _data_lines(tmp_path / "other")[-1]
    steps = len(mf.load(packed_dataset).sample_ids("train", 0, 96)) // GBS
    assert _nodes(line) == {decode: 2 * steps} and line["data/remote_units"] == 2 * steps, line
    assert decode != head


@pytest.mark.chaos  # ~31 s; the module's last test: it removes the decode node
def test_decode_node_lost_mid_run_training_goes_on_exactly_once(
    cluster, on_trainer_node, packed_dataset, tmp_path
):
    """The decode node is lost while epoch 1 trains (its units already decoded): epoch 2's units meet
    dead actors, are decoded again on the trainer's node, and every sample is still trained once."""
    import psutil

    c, head, node = cluster
    decode = node.node_id
    box: dict = {}
    extra = ("run.workers=1", "data.decode_nodes=decode", "debug.step_sleep_s=1.5")
    th = threading.Thread(
        target=lambda: box.setdefault("out", _fit(packed_dataset, tmp_path, "lost", *extra)), daemon=True
    )
    th.start()
    log = tmp_path / "lost" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and '"train"' in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "out" not in box, "the run ended before the decode node could be removed"
    raylet = node.all_processes["raylet"][0].process.pid
    workers = psutil.Process(raylet).children(recursive=True)
    c.remove_node(node, allow_graceful=False)
    for p in workers:  # a lost VM takes its processes with it (see test_ray_decode's node-loss test)
        if p.is_running():
            p.kill()
    th.join(240)
    assert not th.is_alive() and "out" in box
    _check_exactly_once(tmp_path / "lost", packed_dataset)
    first, second = _data_lines(tmp_path / "lost")
    steps = len(mf.load(packed_dataset).sample_ids("train", 0, 96)) // GBS
    assert _nodes(first) == {decode: steps}, first
    nodes = _nodes(second)
    assert second["data/remote_retries"] >= 1 and nodes.get(head, 0) >= 1, second
    assert sum(nodes.values()) == second["data/remote_units"] == 2 * steps
