"""preemption.py: when ranks ask for a notice, what a notice makes the loop do, and the bad-input lines.

The decisions are checked here with a scripted clock and notice source; the real path (Ray's preemption
watcher, a drained / SIGTERMed node, the checkpoint committed before the deadline) runs in tests/chaos (R7).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from ray_mmd.config import load
from ray_mmd.errors import UserError
from ray_mmd.train.preemption import NO_DEADLINE_S, Notice, PreemptionWatch


@dataclass
class Info:  # the shape of ray.train.PreemptionInfo
    deadline_ms: int | None
    preempted_node_to_ranks: dict


class Script:
    """A notice source and clock: the notice appears at `at` seconds, the node goes `window` s later."""

    def __init__(self, at: float, window: float | None = 30.0, step_s: float = 0.5) -> None:
        self.t, self.at, self.window, self.step_s = 1000.0, 1000.0 + at, window, step_s
        self.probes = 0

    def clock(self) -> float:
        return self.t

    def probe(self):
        self.probes += 1
        if self.t < self.at:
            return None
        dl = int((self.at + self.window) * 1000) if self.window is not None else None
        return Info(dl, {"node-b": [1]})


def run(watch: PreemptionWatch, s: Script, steps: int) -> list[tuple[int, object]]:
    out = []
    for step in range(1, steps + 1):
        s.t += s.step_s
        d = watch.poll(step)
        if d is not None:
            out.append((step, d))
            if d.checkpoint:
                s.t += 0.8  # what the checkpoint cost
                watch.checkpointed(0.8)
            if d.stop:
                break
    return out


def watch(s: Script, **kw) -> PreemptionWatch:
    kw.setdefault("cadence", 4)
    return PreemptionWatch(probe=s.probe, broadcast=lambda v: v, clock=s.clock, **kw)


def test_asks_only_every_cadence_steps_so_every_rank_calls_the_barrier_equally():
    s = Script(at=1e9)
    w = watch(s, cadence=4)
    assert run(w, s, 20) == []
    assert s.probes == 5  # steps 4, 8, 12, 16, 20
    assert watch(Script(at=0), enabled=False).poll(4) is None


def test_deadline_mode_checkpoints_at_the_notice_then_just_before_the_deadline():
    s = Script(at=5.0, window=30.0)
    w = watch(s, mode="deadline", margin_s=3.0)
    got = run(w, s, 1000)
    (s1, first), (s2, last) = got
    assert first.reason == "preempt-notice" and first.checkpoint and not first.stop
    assert first.notice.ranks == [1] and first.notice.nodes == {"node-b": [1]}
    assert last.reason == "preempt-deadline" and last.checkpoint and last.stop
    left = first.notice.deadline - s.t  # after the final checkpoint
    # it trained on through the window and still finished its checkpoint before the deadline
    assert s2 > s1 + 20 and 0 < left < 3.0 + 4 * 0.5 + 2 * 0.8 + 1


def test_handoff_mode_stops_right_after_the_notice_checkpoint():
    s = Script(at=5.0)
    got = run(watch(s, mode="handoff"), s, 1000)
    assert len(got) == 1 and got[0][1].checkpoint and got[0][1].stop and got[0][0] == 12


def test_ignore_mode_only_counts_the_notice():
    s = Script(at=5.0)
    w = watch(s, mode="ignore")
    got = run(w, s, 200)
    assert len(got) == 1 and not got[0][1].checkpoint and not got[0][1].stop and w.notices == 1


def test_a_notice_with_too_little_time_left_checkpoints_and_stops_at_once():
    s = Script(at=5.0, window=2.0)
    got = run(watch(s, mode="deadline"), s, 100)
    assert len(got) == 1 and got[0][1].checkpoint and got[0][1].stop


def test_a_drain_without_deadline_gets_rays_default_window():
    n = Notice.from_info(Info(None, {"n": [0, 1]}), step=7, now=50.0)
    assert n.deadline == 50.0 + NO_DEADLINE_S and not n.had_deadline and n.ranks == [0, 1]
    assert "deadline in 120.0 s" in n.describe()


def test_deadline_decision_is_rank_zeros():
    """Other ranks follow rank 0's broadcast even if their own clock says otherwise."""
    s = Script(at=0.0, window=1e6)
    said = []
    w1 = PreemptionWatch(
        cadence=1,
        mode="deadline",
        rank=1,
        probe=s.probe,
        broadcast=lambda v: said.append(v) or True,
        clock=s.clock,
    )
    assert w1.poll(1).reason == "preempt-notice"
    d = w1.poll(2)
    assert said == [None] and d is not None and d.stop  # rank 1 sent nothing, got rank 0's "near"


@pytest.mark.parametrize(
    "override, msg",
    [
        ("run.preemption_poll_every=0", "run.preemption_poll_every: 0"),
        ("run.on_preemption=later", "run.on_preemption: 'later'"),
        ("run.max_failures=-2", "run.max_failures: -2"),
        ("run.max_preemption_failures=-5", "run.max_preemption_failures: -5"),
        ("run.workers=3,2", "MIN 3 > MAX 2"),
    ],
)
def test_bad_values_fail_at_start_with_one_line(override, msg):
    with pytest.raises(UserError, match=msg.replace("(", r"\(")) as e:
        load(None, [override])
    assert "\n" not in str(e.value)


def test_minus_one_means_no_limit():
    cfg = load(None, ["run.max_failures=-1", "run.max_preemption_failures=-1"])
    assert cfg.run.max_failures == -1


def test_cli_prints_one_line_and_exits_2_for_bad_input():
    for args in (["--workers", "0"], ["run.preemption_poll_every=0"], ["--workers", "3,2"]):
        p = subprocess.run(
            [sys.executable, "-m", "ray_mmd.cli", "train", *args], capture_output=True, text=True, timeout=120
        )
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "error" in p.stderr, p.stderr
        if args[0] == "--workers" and args[1] == "0":
            assert "--workers 0: a run needs at least one worker" in p.stderr


def test_driver_fits_again_after_each_handoff_and_counts_them(tmp_path):
    """The workers left a HANDOFF marker: the driver fits again (resume) until a fit ends without one;
    past run.max_preemption_failures it stops with one line."""
    import json as js
    from types import SimpleNamespace

    from ray_mmd.train.preemption import HANDOFF, PreemptionBudgetExceeded, fit_through_handoffs

    marker = tmp_path / HANDOFF
    note = js.dumps({"step": 3, "seen_at": 0, "deadline": 0, "nodes": {}, "ranks": [1], "had_deadline": True})
    fits = []

    def fit(handoffs: int):
        def run():
            fits.append(1)
            if len(fits) <= handoffs:
                marker.write_text(note)
                return SimpleNamespace(metrics={"reason": "preempt-deadline"})
            return SimpleNamespace(metrics={"reason": "final"})

        return run

    cfg = SimpleNamespace(name="r", max_preemption_failures=-1)
    assert fit_through_handoffs(fit(2), str(tmp_path), cfg).metrics["reason"] == "final"
    assert len(fits) == 3 and not marker.exists()
    fits.clear()
    with pytest.raises(PreemptionBudgetExceeded, match="2 preemptions exceed run.max_preemption_failures=1"):
        fit_through_handoffs(fit(5), str(tmp_path), SimpleNamespace(name="r", max_preemption_failures=1))
