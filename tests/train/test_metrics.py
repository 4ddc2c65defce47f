"""train/metrics.py: the window read at the log interval, the non-finite guard, and the run's metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import torch

from ray_mmd.train.metrics import MetricsWindow, NonFiniteLossError, RunLog
from ray_mmd.train.state import Progress


def _out(loss: float) -> dict[str, torch.Tensor]:
    t = torch.tensor(loss)
    return {"loss": t, "mask": t / 2, "finite": torch.isfinite(t)}


def test_window_means_finite_steps_and_counts_skips():
    w, p = MetricsWindow(abort_after=3, log_every=4, rank=0), Progress()
    for step, loss in enumerate([1.0, float("nan"), 3.0, 2.0]):
        w.add(step, _out(loss), torch.tensor([step]), images=8)
    m = w.flush(p, lr=0.5, last_good=None)
    assert m["loss"] == pytest.approx(2.0) and m["mask"] == pytest.approx(1.0)
    assert m["skipped_steps"] == p.skipped_steps == 1 and m["lr"] == 0.5 and m["img_per_s"] > 0
    assert w.streak == 0 and w.flush(p, 0.5, None) == {}  # read once; an empty window is {}


def test_streak_across_flushes_aborts_with_ids_and_last_good():
    w, p = MetricsWindow(abort_after=3, log_every=2, rank=1), Progress()
    w.add(0, _out(float("inf")), torch.tensor([7, 8]), images=2)
    w.add(1, _out(float("nan")), torch.tensor([9, 10]), images=2)
    w.flush(p, 0.1, "gs://b/r/checkpoint_000000000_x")
    assert w.streak == 2
    w.add(2, _out(float("nan")), torch.tensor([11, 12]), images=2)
    with pytest.raises(NonFiniteLossError) as e:
        w.flush(p, 0.1, "gs://b/r/checkpoint_000000000_x")
    msg = str(e.value)
    assert "3 non-finite losses in a row ending at global step 2" in msg and "(rank 1): [11, 12]" in msg
    assert msg.endswith("checkpoint (before the streak): gs://b/r/checkpoint_000000000_x")


def test_runlog_drops_lines_past_the_resumed_step(tmp_path):
    log = RunLog(str(tmp_path))
    for s in (2, 4, 6):
        log.scalars(s, {"train/loss": float(s)})
    log.close()
    log = RunLog(str(tmp_path), resume_step=4)  # an attempt that resumes at step 4 trains 5, 6 again
    log.scalars(6, {"eval/iou": 0.5}, kind="eval")
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["kind"], x["step"]) for x in lines] == [("train", 2), ("train", 4), ("eval", 6)]


def test_data_counters_carry_the_ray_decoders_units_per_node():
    from ray_mmd.train.metrics import data_counters

    base = {"samples": 32, "decoded": 32, "dropped_total": 6}
    ray_stats = {**base, "remote_units": 4, "remote_retries": 1, "remote_nodes": {"n1": 3, "n2": 1}}
    out = data_counters(ray_stats, torch.device("cpu"), world=1, rank=0)
    assert out["data/remote_units"] == 4 and out["data/remote_retries"] == 1
    assert {k: v for k, v in out.items() if k.startswith("data/remote_nodes/")} == {
        "data/remote_nodes/n1": 3,
        "data/remote_nodes/n2": 1,
    }
    assert not any("remote" in k for k in data_counters(base, torch.device("cpu"), 1, 0))  # threads
