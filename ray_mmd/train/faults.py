"""Test-only hooks (debug.*): NaN targets, recorded sample ids, a slowed step, an injected crash or
SIGKILL. `DebugHooks.from_config` is None unless a debug option is set, so production steps never
reach this module."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from ray_mmd.config import DebugConfig
from ray_mmd.train.state import IdLedger

log = logging.getLogger("ray_mmd.train")


class DebugHooks:
    def __init__(self, d: DebugConfig, rank: int, world: int, ledger: IdLedger) -> None:
        self.d, self.rank, self.world, self.ledger = d, rank, world, ledger

    @classmethod
    def from_config(cls, d: DebugConfig, rank: int, world: int, ledger: IdLedger) -> DebugHooks | None:
        active = (
            d.record_ids
            or d.nan_at_steps
            or d.step_sleep_s
            or d.kill_at_step is not None
            or d.fail_at_step is not None
        )
        return cls(d, rank, world, ledger) if active else None

    def before_step(self, step: int, batch: dict[str, Any], ids: torch.Tensor) -> dict[str, Any]:
        if self.d.nan_at_steps and step in self.d.nan_at_steps:
            # a NaN target makes the loss non-finite without touching BatchNorm statistics
            batch = {**batch, "depth": torch.full_like(batch["depth"], float("nan"))}
        if self.d.record_ids:
            self.ledger.record(step, self.world, _gather_ids(ids.tolist(), self.world))
        return batch

    def after_step(self, global_step: int) -> None:
        if self.d.step_sleep_s:
            time.sleep(self.d.step_sleep_s)
        self._maybe_kill(global_step)

    def _maybe_kill(self, global_step: int) -> None:
        """SIGKILL this worker process (or raise, in-process) once, at a given step."""
        d = self.d
        at = d.kill_at_step if d.kill_at_step is not None else d.fail_at_step
        if at is None or global_step != at:
            return
        if self.rank != d.kill_rank % self.world or not d.kill_marker or os.path.exists(d.kill_marker):
            return
        with open(d.kill_marker, "w") as f:
            f.write(str(os.getpid()))
        if d.kill_at_step is None:
            raise RuntimeError(f"chaos: injected failure at step {at}")
        log.warning("chaos: SIGKILL worker pid %d at step %d", os.getpid(), global_step)
        os.kill(os.getpid(), signal.SIGKILL)


def _gather_ids(ids: list[int], world: int) -> list[int]:
    if world == 1 or not dist.is_initialized():
        return ids
    out: list[Any] = [None] * world
    dist.all_gather_object(out, ids)
    return [i for part in out for i in part]
