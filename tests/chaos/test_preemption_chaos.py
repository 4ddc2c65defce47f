"""R7: preemption notices on a real multi-node Ray, delivered the two ways spot capacity delivers them.

- R7a (short, in `make test`): `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` with a 20 s deadline,
  then the node is killed at the deadline; on_preemption=deadline.
- R7b: SIGTERM to a worker node's `ray start --block` process (the GCE spot / pod-deletion path: Ray drains
  its own node with reason PREEMPTION and a 30 s deadline, then tears it down).
- R7c: R7a's notice with on_preemption=handoff, to compare the time each wastes.
`run.max_failures=0`: were a preemption charged to max_failures, the run would end with an error. The
periodic checkpoint is off (epoch ends only), so without the notice checkpoint steps would be lost.
"""

from __future__ import annotations

import time

import pytest

from tests.chaos.chaos_harness import Scenario, reference, write_report

pytestmark = pytest.mark.slow
EPOCHS = 8
BASE = [
    "run.max_failures=0",
    "run.preemption_poll_every=2",
    "checkpoint.every_steps=1000",
    "debug.step_sleep_s=0.3",
]


def _drain_then_kill(sc: Scenario, workers: int, deadline_s: int = 20) -> float:
    """Drain a node that hosts a train worker at a seeded random step; kill it at the deadline."""
    sc.tail.wait_step(sc.r.randint(4, 10))
    pid, node = sc.victim(workers)
    time.sleep(sc.r.uniform(0, 0.5))
    sc.cluster.drain_node(node, deadline_s)
    f = sc.fault(f"drain-node PREEMPTION ({deadline_s} s)", f"{node.name}, train worker pid {pid}")
    time.sleep(max(0.0, f.at + deadline_s - time.time()))
    sc.cluster.kill_node(node)
    sc.fault("node killed at the deadline", node.name)
    return f.at


def test_r7a_drain_notice_checkpoints_and_loses_no_step(cluster, packed_dataset, tmp_path):
    c = cluster(3)
    sc = Scenario(
        "R7a-drain-deadline",
        "ray drain-node PREEMPTION, 20 s deadline, node killed at the deadline; 3 nodes, 2 workers, "
        "on_preemption=deadline",
        71,
        c,
        tmp_path,
        packed_dataset,
        EPOCHS,
        [*BASE, "run.workers=2", "optim.deterministic=true", "run.on_preemption=deadline"],
    ).start()
    notice = _drain_then_kill(sc, 2)
    res = sc.finish()
    res.notice_to_checkpoint_s = sc.jit_checkpoints(notice)
    write_report(res)
    assert res.notices == 1 and len(res.notice_to_checkpoint_s) == 2  # at the notice, before the deadline
    assert res.exactly_once and res.samples_trained == res.samples_expected
    assert res.steps_lost == 0, res
    assert "preemption hand-off 1" in sc.driver.output()


@pytest.mark.chaos
def test_r7b_sigterm_to_ray_start_is_a_preemption_notice(cluster, packed_dataset, tmp_path, references):
    c = cluster(3)
    extra = [*BASE, "run.workers=2", "optim.deterministic=true", "run.on_preemption=deadline"]
    ref = reference(references, c, packed_dataset, EPOCHS)
    sc = Scenario(
        "R7b-sigterm",
        "SIGTERM to a worker node's `ray start --block` (Ray drains it: PREEMPTION, 30 s deadline); "
        "3 nodes, 2 workers (fixed world size), on_preemption=deadline",
        72,
        c,
        tmp_path,
        packed_dataset,
        EPOCHS,
        extra,
    ).start()
    sc.tail.wait_step(sc.r.randint(4, 10))
    pid, node = sc.victim(2)
    time.sleep(sc.r.uniform(0, 0.5))
    c.sigterm_node(node)
    f = sc.fault("SIGTERM to ray start --block", f"{node.name}, train worker pid {pid}")
    res = sc.finish(reference=ref)
    node.proc.wait(60)
    gone = time.time()
    res.notice_to_checkpoint_s = sc.jit_checkpoints(f.at)
    res.notes.append(
        f"ray start exited {node.proc.returncode} by itself (drain over) within {gone - f.at:.0f} s"
    )
    write_report(res)
    assert res.notices == 1 and res.notice_to_checkpoint_s
    assert res.exactly_once and res.steps_lost == 0 and res.worlds == [2]
    assert res.bitwise


@pytest.mark.chaos
def test_r7c_handoff_right_after_the_notice(cluster, packed_dataset, tmp_path, references):
    c = cluster(3)
    ref = reference(references, c, packed_dataset, EPOCHS)
    sc = Scenario(
        "R7c-drain-handoff",
        "as R7a (same seed), on_preemption=handoff: move to the other nodes right after the notice checkpoint",
        71,
        c,
        tmp_path,
        packed_dataset,
        EPOCHS,
        [*BASE, "run.workers=2", "optim.deterministic=true", "run.on_preemption=handoff"],
    ).start()
    notice = _drain_then_kill(sc, 2)
    res = sc.finish(reference=ref)
    res.notice_to_checkpoint_s = sc.jit_checkpoints(notice)
    write_report(res)
    assert res.notices == 1 and len(res.notice_to_checkpoint_s) == 1 and res.bitwise
    assert res.exactly_once and res.steps_lost == 0
