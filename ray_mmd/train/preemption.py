"""Preemption notices -> just-in-time checkpoints: when to ask Ray Train, and what a notice asks the loop to do.

Spot capacity warns before it takes a node (GCE: ~30 s; `ray start --block` turns the SIGTERM into a drain
with reason PREEMPTION and a deadline; `ray drain-node` does the same by hand). Ray Train's preemption
watcher sees the drain and `ray.train.get_preemption_info()` hands it to the training function. That call is
a barrier, so every rank asks at the same global steps (every `run.preemption_poll_every` steps).

On a notice the loop writes a checkpoint of the current step at once (synchronously, verified), and then,
by `run.on_preemption`:
- "handoff" (default): hand the run over right after the notice checkpoint; the surviving nodes train the
  window. Measured in tests/chaos (R7a vs R7c, same notice): 15.0 s idle vs 16.0 s for "deadline", wall
  52 s vs 57 s, both 0 steps lost; and it does not depend on judging the deadline.
- "deadline": keep training at full strength through the drain window; a second checkpoint is
  taken when the deadline is closer than the margin (plus what one poll interval and one checkpoint cost),
  and the attempt then hands the run over. Steps lost: 0; time lost: one restart.
- "ignore": only log and count the notice (Ray restarts from the last periodic checkpoint).
"Hand over" means the workers return cleanly and the driver fits again at once (`HANDOFF` marker in the
run dir): waiting for Ray's own restart would idle every rank until the deadline, and a worker that exits
on purpose would count as a real failure against `max_failures`. Neither way uses `max_failures`.

`PreemptionWatch.poll` decides; `PreemptionWatch.act` writes and verifies the checkpoint through the run's
checkpointer and hands the run over; `fit_through_handoffs` is the driver's side. Rank 0 decides when
the deadline is near and broadcasts it (clocks differ between ranks; a decision that
differed would leave one rank waiting in `report` for the others).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("ray_mmd.train")

HANDOFF = "HANDOFF"  # file in the run dir: the attempt stopped for a preemption; the driver fits again
MODES = ("deadline", "handoff", "ignore")
# Ray Train's fallback when a drain has no deadline (DEFAULT_PREEMPTION_DEADLINE_S in ray.train.v2)
NO_DEADLINE_S = 120.0


class PreemptionBudgetExceeded(RuntimeError):
    """More hand-offs than run.max_preemption_failures allows."""


@dataclass
class Notice:
    """A preemption notice as the loop saw it."""

    step: int  # global steps completed when it was seen
    seen_at: float  # unix time
    deadline: float  # unix time the node goes (Ray's fallback when the drain had none)
    nodes: dict[str, list[int]]  # node id -> world ranks on it
    ranks: list[int]
    had_deadline: bool = True

    @classmethod
    def from_info(cls, info: Any, step: int, now: float) -> Notice:
        nodes = {str(k): sorted(int(r) for r in v) for k, v in info.preempted_node_to_ranks.items()}
        ms = info.deadline_ms
        return cls(
            step=step,
            seen_at=now,
            deadline=ms / 1000.0 if ms else now + NO_DEADLINE_S,
            nodes=nodes,
            ranks=sorted({r for v in nodes.values() for r in v}),
            had_deadline=bool(ms),
        )

    def describe(self) -> str:
        nodes = ", ".join(f"{n[:12]} (ranks {r})" for n, r in sorted(self.nodes.items()))
        left = self.deadline - self.seen_at
        return f"preemption notice at step {self.step}: node {nodes}; deadline in {left:.1f} s" + (
            "" if self.had_deadline else " (none given: Ray's default)"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class Decision:
    """What the loop does now: checkpoint this step (verified), and whether to hand the run over after."""

    notice: Notice
    reason: str  # "preempt-notice" | "preempt-deadline"
    checkpoint: bool
    stop: bool


@dataclass
class PreemptionWatch:
    """Asks Ray Train for a notice every `cadence` global steps and decides what the loop does with it.

    `probe` and `broadcast` are Ray Train's `get_preemption_info` / `collective.broadcast_from_rank_zero`
    (barriers across ranks); `clock` is time.time. They are parameters so the decisions can be checked
    without a cluster.
    """

    cadence: int
    mode: str = "handoff"
    margin_s: float = 8.0
    rank: int = 0
    enabled: bool = True
    probe: Callable[[], Any] | None = None
    broadcast: Callable[[Any], Any] | None = None
    clock: Callable[[], float] = time.time
    notice: Notice | None = None
    notices: int = 0  # seen by this attempt
    ckpt_s: float = 1.0  # how long the last just-in-time checkpoint took (estimate before the first)
    step_s: float | None = None  # seconds per global step (moving average)
    finished: bool = False  # the final checkpoint is written: nothing more to do
    pending: Decision | None = None  # asked at an epoch's last step: the epoch-end checkpoint is the one
    handed_off: bool = False  # this attempt stopped for a preemption
    _last: tuple[int, float] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.cadence < 1:
            raise ValueError(f"preemption poll cadence must be >= 1 (got {self.cadence})")
        if self.mode not in MODES:
            raise ValueError(f"on_preemption must be one of {MODES} (got {self.mode!r})")

    @classmethod
    def from_config(cls, run_cfg: Any, rank: int, enabled: bool = True) -> PreemptionWatch:
        return cls(
            cadence=run_cfg.preemption_poll_every,
            mode=run_cfg.on_preemption,
            margin_s=run_cfg.preemption_margin_s,
            rank=rank,
            enabled=enabled,
        )

    def _probe(self) -> Any:
        if self.probe is not None:
            return self.probe()
        import ray.train

        return ray.train.get_preemption_info()

    def _broadcast(self, value: Any) -> Any:
        if self.broadcast is not None:
            return self.broadcast(value)
        from ray.train.collective import broadcast_from_rank_zero

        return broadcast_from_rank_zero(value)

    def poll(self, step: int) -> Decision | None:
        """Called by every rank after every step (`step` = global steps completed). Barriers only at
        multiples of the cadence, where every rank is at the same step."""
        if not self.enabled or self.finished or step % self.cadence:
            return None
        now = self.clock()
        if self._last is not None and step > self._last[0]:
            per = (now - self._last[1]) / (step - self._last[0])
            self.step_s = per if self.step_s is None else 0.7 * self.step_s + 0.3 * per
        self._last = (step, now)
        if self.notice is None:
            info = self._probe()
            if info is None:
                return None
            self.notice = Notice.from_info(info, step, now)
            self.notices += 1
            if self.rank == 0:
                log.warning(
                    "%s; writing a checkpoint now (on_preemption=%s)", self.notice.describe(), self.mode
                )
            if self.mode == "ignore":
                self.finished = True
                return Decision(self.notice, "preempt-notice", checkpoint=False, stop=False)
            stop = self.mode == "handoff" or self._deadline_near(now)
            self.finished = stop
            return Decision(self.notice, "preempt-notice", checkpoint=True, stop=stop)
        # "deadline": train on; rank 0 says when the next poll could come too late
        near = bool(self._broadcast(self._deadline_near(now) if self.rank == 0 else None))
        if not near:
            return None
        self.finished = True
        if self.rank == 0:
            log.warning(
                "preemption deadline in %.1f s: final checkpoint at step %d, then the run moves on",
                self.notice.deadline - now,
                step,
            )
        return Decision(self.notice, "preempt-deadline", checkpoint=True, stop=True)

    def agree(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank (a barrier)."""
        return self._broadcast(value if self.rank == 0 else None)

    def _deadline_near(self, now: float) -> bool:
        """True when waiting one more poll interval could leave no time for a checkpoint."""
        assert self.notice is not None
        interval = self.cadence * (self.step_s or 0.0)
        return self.notice.deadline - now <= self.margin_s + interval + 2.0 * self.ckpt_s

    def act(self, d: Decision, run: Any, metrics: dict[str, Any], reason: str | None = None) -> bool:
        """Carry out `d` on `run` (the loop's Run: save, ckpt, runlog, stream, rank, run_url): write this
        step's checkpoint synchronously, verify it, log and count it; True = stop, the run is handed over.
        At an epoch's last step it waits for the epoch-end checkpoint (`reason`: that one's reason)."""
        from ray_mmd import storage
        from ray_mmd.train.checkpoint import CheckpointError, load_checkpoint

        step, n = run.progress.global_step, d.notice
        if run.runlog is not None and d.reason == "preempt-notice" and reason is None:
            left = n.deadline - n.seen_at
            run.runlog.scalars(
                step, {"preempt/notices": self.notices, "preempt/deadline_in_s": left}, "preemption"
            )
        if not d.checkpoint:
            return False
        if reason is None and run.stream.steps_left() == 0:  # the epoch-end checkpoint follows at once
            self.pending = d
            return False
        self.pending = None
        t0 = time.time()
        run.save(metrics, reason or d.reason, sync=True)
        ok = True
        if self.rank == 0:
            try:
                load_checkpoint(run.ckpt.last)
            except CheckpointError as e:  # train on: Ray restarts from the newest one that verifies
                log.error("preemption checkpoint did not verify: %s", e)
                ok = False
        ok = bool(self.agree(ok))
        dt = time.time() - t0
        self.checkpointed(dt)
        now = time.time()
        if self.rank == 0:
            log.warning(
                "preemption checkpoint %s at step %d verified: %.2f s to write, %.2f s after the notice, "
                "%.1f s before the deadline",
                *(run.ckpt.last, step, dt, now - n.seen_at, n.deadline - now),
            )
        if run.runlog is not None:
            values = {
                "preempt/checkpoint_s": dt,
                "preempt/notice_to_checkpoint_s": now - n.seen_at,
                "preempt/deadline_left_s": n.deadline - now,
                "preempt/verified": float(ok),
                "preempt/final": float(d.stop),
            }
            run.runlog.scalars(step, values, "preemption")
        stop = d.stop and ok and not run.stream.done
        if stop:
            self.handed_off = True
            if self.rank == 0:
                storage.write_bytes_atomic(handoff_marker(run.run_url), n.to_json().encode())
        return stop

    def checkpointed(self, seconds: float) -> None:
        """The loop reports how long a just-in-time checkpoint took (write + upload + verify)."""
        self.ckpt_s = seconds
        if self._last is not None:  # the checkpoint is not step time
            self._last = (self._last[0], self._last[1] + seconds)


WATCHER_POLL_S = "1"  # Ray Train's preemption watcher asks GCS for drains this often (Ray's default: 5 s)


def watch_drains_often() -> None:
    """Driver side, before fit: a notice reaches the workers within ~1 s instead of up to 5 s (one cheap
    GCS call a second). Ray Train propagates the variable from the driver to its controller; a value the
    user set wins."""
    import os

    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", WATCHER_POLL_S)


def wait_nodes_gone(notice: dict[str, Any], grace_s: float = 10.0) -> float:
    """Driver side, after a hand-off: wait until the preempted nodes have left the cluster (a draining node
    shuts itself down once idle, i.e. once our workers on it are gone), at most until the deadline plus
    `grace_s`. Fitting again earlier would count the draining node's free CPUs and wait for a placement
    that never comes. Returns the seconds waited."""
    import ray

    ids = set(notice.get("nodes", {}))
    t0 = time.time()
    until = float(notice.get("deadline", t0)) + grace_s
    while ids and time.time() < until:
        if not ids & {n["NodeID"] for n in ray.nodes() if n.get("Alive")}:
            break
        time.sleep(0.25)
    return time.time() - t0


def fit_through_handoffs(fit: Callable[[], Any], run_url: str, run_cfg: Any) -> Any:
    """Driver side: `fit()` and, each time the workers stepped aside on a preemption notice (HANDOFF
    marker), wait for the preempted nodes to leave and fit again; the run resumes from the preemption
    checkpoint. Counted against run.max_preemption_failures, never max_failures."""
    from ray_mmd import storage

    watch_drains_often()
    marker = handoff_marker(run_url)
    storage.remove(marker)  # an earlier driver's
    result = fit()
    handoffs = 0
    while storage.exists(marker):
        note = json.loads(storage.read_bytes(marker).decode())
        storage.remove(marker)
        if (result.metrics or {}).get("reason") == "final":  # Ray restarted it and it finished meanwhile
            break
        handoffs += 1
        budget = run_cfg.max_preemption_failures
        if budget != -1 and handoffs > budget:
            raise PreemptionBudgetExceeded(
                f"run {run_cfg.name}: {handoffs} preemptions exceed run.max_preemption_failures={budget}; "
                "re-run the same command to resume from the preemption checkpoint"
            )
        waited = wait_nodes_gone(note)
        log.warning(
            "preemption hand-off %d: resuming on the nodes that stay (the preempted ones left %.1f s after "
            "the checkpoint); notice: %s",
            *(handoffs, waited, note),
        )
        result = fit()
    return result


def handoff_marker(run_url: str) -> str:
    from ray_mmd import storage

    return storage.join(run_url, HANDOFF)
