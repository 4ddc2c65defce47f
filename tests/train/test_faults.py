"""faults.py: the debug hooks are None unless a debug option is set; NaN injection and the id ledger."""

from __future__ import annotations

import pytest
import torch

from ray_mmd.config import load
from ray_mmd.train.faults import DebugHooks
from ray_mmd.train.state import IdLedger


def test_no_hooks_in_production():
    assert DebugHooks.from_config(load(None, []).debug, 0, 1, IdLedger()) is None


def test_nan_targets_and_recorded_ids():
    ledger = IdLedger()
    d = load(None, ["debug.nan_at_steps=[3]", "debug.record_ids=true"]).debug
    hooks = DebugHooks.from_config(d, 0, 1, ledger)
    batch = {"x": torch.zeros(2, 6, 4, 4), "depth": torch.zeros(2, 1, 4, 4)}
    assert torch.equal(hooks.before_step(2, batch, torch.tensor([5, 6]))["depth"], batch["depth"])
    assert hooks.before_step(3, batch, torch.tensor([7, 8]))["depth"].isnan().all()
    assert ledger.steps == {"2": {"world": 1, "ids": [5, 6]}, "3": {"world": 1, "ids": [7, 8]}}


def test_injected_failure_fires_once(tmp_path):
    marker = tmp_path / "m"
    d = load(None, ["debug.fail_at_step=4", f"debug.kill_marker={marker}", "debug.kill_rank=0"]).debug
    hooks = DebugHooks.from_config(d, 0, 1, IdLedger())
    hooks.after_step(3)
    with pytest.raises(RuntimeError, match="chaos: injected failure at step 4"):
        hooks.after_step(4)
    hooks.after_step(4)  # the marker exists: a restarted attempt passes the step
    assert marker.exists()
