"""Chaos on a real multi-node Ray (ray.cluster_utils.Cluster: a 0-CPU head + two 1-CPU worker nodes).

- a train worker SIGKILLed mid-epoch: the run completes, every sample of each epoch is trained exactly
  once, and (fixed world size, deterministic mode) the final weights equal an uninterrupted run's bitwise;
- a node removed mid-run: training continues elastically on one worker, exactly-once still holds and the
  global batch is unchanged.
Exactly-once is read from the IdLedger kept *in the checkpointed state*, so it lists exactly the steps
that count in the final weights (work lost with a killed worker is not in it).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from ray_mmd.config import load
from ray_mmd.data import manifest as mf
from ray_mmd.train import checkpoint as ck
from ray_mmd.train import trainer
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow
GBS = 16


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    # fast node-death detection (Ray's own fault-tolerance tests shorten the same health checks)
    fast = {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 3,
    }
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": fast})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    try:
        ray.init(address=c.address, log_to_driver=False)
        c.wait_for_nodes()
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


def _cfg(packed: str, storage: Path, name: str, *extra: str):
    return load(
        None,
        tiny_overrides(
            packed,
            storage,
            name,
            "run.max_failures=2",
            f"data.global_batch_size={GBS}",
            "data.chunks=[[0,96,2]]",
            "debug.record_ids=true",
            *extra,
        ),
    )


def _check_exactly_once(run: Path, packed: str) -> dict:
    sd, _, _ = ck.final_checkpoint(str(run))
    train_ids = set(mf.load(packed).sample_ids("train", 0, 96).tolist())
    per_epoch = len(train_ids) // GBS
    steps = sd["ids"]["steps"]
    assert sorted(int(s) for s in steps) == list(range(2 * per_epoch))
    assert all(len(rec["ids"]) == GBS for rec in steps.values())  # the global batch never changed
    for e in range(2):
        ids = [i for s in range(e * per_epoch, (e + 1) * per_epoch) for i in steps[str(s)]["ids"]]
        assert len(ids) == len(set(ids)) == per_epoch * GBS and set(ids) <= train_ids
    return sd


def test_worker_sigkill_mid_epoch_resumes_bitwise(cluster, packed_dataset, tmp_path):
    det = ("run.workers=2", "optim.deterministic=true")
    trainer.fit(_cfg(packed_dataset, tmp_path, "straight", *det))
    marker = tmp_path / "kill.marker"
    chaos = ("debug.kill_at_step=3", f"debug.kill_marker={marker}", "debug.kill_rank=1")
    out = trainer.fit(_cfg(packed_dataset, tmp_path, "killed", *det, *chaos))
    assert marker.exists() and out.metrics["reason"] == "final"
    sd = _check_exactly_once(tmp_path / "killed", packed_dataset)
    assert sd["progress"]["restarts"] == 1
    a = ck.final_checkpoint(str(tmp_path / "straight"))[0]["model"]
    assert a.keys() == sd["model"].keys() and all(torch.equal(a[k], sd["model"][k]) for k in a)


def test_node_removed_mid_run_continues_elastically(cluster, packed_dataset, tmp_path):
    c, nodes = cluster
    cfg = _cfg(
        packed_dataset,
        tmp_path,
        "elastic",
        "run.workers=1,2",
        "debug.step_sleep_s=0.6",
        "run.elastic_resize_interval_s=3600",
    )
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("out", trainer.fit(cfg)), daemon=True)
    th.start()
    run = tmp_path / "elastic"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for a complete checkpoint past step 2, then pull a node
        done = [u for u in ck.list_checkpoints(str(run)) if (Path(u) / ck.META_FILE).exists()]
        if done and int(ck.CKPT_RE.match(Path(done[0]).name).group(1)) >= 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail("no checkpoint within 120 s")
    c.remove_node(nodes[1])
    th.join(240)
    assert not th.is_alive() and box["out"].metrics["reason"] == "final"
    assert box["out"].metrics["world_size"] == 1
    sd = _check_exactly_once(run, packed_dataset)
    worlds = [sd["ids"]["steps"][str(s)]["world"] for s in range(len(sd["ids"]["steps"]))]
    assert worlds[0] == 2 and worlds[-1] == 1 and sorted(set(worlds)) == [1, 2]
