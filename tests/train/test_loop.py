"""loop.py in-process (run.workers=0: Ray Train's local mode): learning, exact resume, NaN abort and skips."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ray_mmd.config import TrainConfig, load
from ray_mmd.data import manifest as mf
from ray_mmd.train import checkpoint as ck
from ray_mmd.train import inputs, trainer


def tiny(packed: str, storage: str, name: str, *extra: str) -> TrainConfig:
    return load(
        None,
        [
            f"data.url={packed}",
            f"run.storage={storage}",
            f"run.name={name}",
            "run.workers=0",
            "run.progress=false",
            "run.log_every=2",
            "model.width=4",
            "data.image_size=32",
            "data.global_batch_size=16",
            "data.chunks=[[0,96,2]]",
            "optim.lr=0.02",
            "optim.amp=off",
            "checkpoint.every_steps=3",
            "eval.max_samples=16",
            "eval.batch_size=16",
            *extra,
        ],
    )


def weights(run_url: str) -> dict[str, torch.Tensor]:
    sd, _, _ = ck.final_checkpoint(run_url)
    return sd["model"]


def test_learns_and_writes_run_dir(packed_dataset, tmp_path):
    cfg = tiny(packed_dataset, str(tmp_path), "learn", "data.chunks=[[0,200,6]]", "optim.lr=0.03")
    out = trainer.fit(cfg)
    run = tmp_path / "learn"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x["train/loss"] for x in lines if x["kind"] == "train"]
    evals = [x for x in lines if x["kind"] == "eval"]
    assert len(evals) == 6 and any("iou" in k for k in evals[-1])
    data = [x for x in lines if x["kind"] == "data"][-1]  # the input pipeline's counters, last epoch
    man = mf.load(packed_dataset)
    per_epoch = len(man.sample_ids("train", 0, 200)) // 16 * 16
    assert data["data/samples"] == 6 * per_epoch and data["data/quarantined"] == 0, data
    assert sum(train[-3:]) / 3 < 0.8 * sum(train[:3]) / 3, train  # the loss fell clearly
    assert (run / "grid_latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "tensorboard"))
    assert out.checkpoint is not None and out.checkpoint.startswith(str(run))
    assert len(ck.list_checkpoints(str(run))) == cfg.checkpoint.num_to_keep
    sd, meta, _ = ck.final_checkpoint(str(run))
    assert meta["reason"] == "final" and sd["data"]["chunk_index"] == 1  # schedule complete


def test_resume_after_crash_is_bitwise_identical(packed_dataset, tmp_path):
    """Crash mid-epoch, a logged step past the last checkpoint; re-run: same weights and log as a straight run."""
    det = ("optim.deterministic=true", "debug.record_ids=true", "run.log_every=1")
    trainer.fit(tiny(packed_dataset, str(tmp_path), "straight", *det))
    marker = tmp_path / "crashed"
    crash = tiny(
        packed_dataset, str(tmp_path), "crashy", *det, "debug.fail_at_step=6", f"debug.kill_marker={marker}"
    )
    with pytest.raises(Exception, match="chaos"):
        trainer.fit(crash)
    assert marker.exists()
    trainer.fit(
        tiny(
            packed_dataset,
            str(tmp_path),
            "crashy",
            *det,
            "debug.fail_at_step=6",
            f"debug.kill_marker={marker}",
        )
    )
    a, b = weights(str(tmp_path / "straight")), weights(str(tmp_path / "crashy"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sd, _, _ = ck.final_checkpoint(str(tmp_path / "crashy"))
    assert sd["progress"]["restarts"] == 1
    train_ids = set(mf.load(packed_dataset).sample_ids("train", 0, 96).tolist())
    per_epoch = len(train_ids) // 16
    steps = sd["ids"]["steps"]
    assert sorted(int(s) for s in steps) == list(range(2 * per_epoch))
    for e in range(2):  # every sample of each epoch exactly once (the < 1 batch remainder dropped)
        ids = [i for s in range(e * per_epoch, (e + 1) * per_epoch) for i in steps[str(s)]["ids"]]
        assert len(ids) == len(set(ids)) == per_epoch * 16 and set(ids) <= train_ids
    # the lost attempt's log lines past the checkpoint are dropped: one line per (kind, step), as straight
    logged = {
        name: [(x["kind"], x["step"]) for x in map(json.loads, (tmp_path / name / "metrics.jsonl").open())]
        for name in ("straight", "crashy")
    }
    assert logged["crashy"] == logged["straight"], logged


def test_read_ahead_feed_checkpoints_the_consumed_position(packed_dataset, tmp_path, monkeypatch):
    """The step's batches read 3 ahead by a producer thread (the CUDA feed's read-ahead, forced on the
    CPU): a checkpoint mid-epoch holds the position of the last batch trained, not the stream's, so a
    crash and resume train every sample once and end bitwise equal to a straight pass-through run."""
    det = ("optim.deterministic=true", "debug.record_ids=true", "run.log_every=1")
    trainer.fit(tiny(packed_dataset, str(tmp_path), "straight", *det))
    monkeypatch.setattr(inputs, "FEED_DEPTH", 3)
    monkeypatch.setattr(inputs, "FEED_THREAD", True)
    marker = tmp_path / "crashed"
    crash = (*det, "debug.fail_at_step=4", f"debug.kill_marker={marker}")
    with pytest.raises(Exception, match="chaos"):
        trainer.fit(tiny(packed_dataset, str(tmp_path), "ahead", *crash))
    sd, meta = ck.load_checkpoint(ck.list_checkpoints(str(tmp_path / "ahead"))[0])
    assert meta["step"] == 3 and meta["reason"] == "interval"  # mid-epoch: 4 steps an epoch
    # the stream itself had read to the end of the epoch by then (3 batches ahead)
    assert (sd["data"]["epoch"], sd["data"]["consumed"]) == (0, 3 * 16), sd["data"]
    trainer.fit(tiny(packed_dataset, str(tmp_path), "ahead", *crash))
    a, b = weights(str(tmp_path / "straight")), weights(str(tmp_path / "ahead"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sd, _, _ = ck.final_checkpoint(str(tmp_path / "ahead"))
    assert sd["progress"]["restarts"] == 1 and sd["data"]["chunk_index"] == 1
    straight, _, _ = ck.final_checkpoint(str(tmp_path / "straight"))
    assert sd["ids"]["steps"] == straight["ids"]["steps"]  # the same samples at every step, each once


def test_nan_streak_aborts_with_ids_and_last_checkpoint(packed_dataset, tmp_path):
    cfg = tiny(packed_dataset, str(tmp_path), "nan", "debug.nan_at_steps=[4,5,6]", "run.nan_abort_after=3")
    with pytest.raises(Exception) as e:
        trainer.fit(cfg)
    msg = str(e.value)
    assert "3 non-finite losses in a row" in msg and "sample ids" in msg
    # steps 0-3 trained (checkpoints at 3 and at the epoch end, 4), then step indexes 4, 5, 6 were non-finite
    assert "checkpoint (before the streak): " in msg and ck.checkpoint_dir_name(4, "") in msg


def test_isolated_nan_steps_are_skipped_and_counted(packed_dataset, tmp_path):
    cfg = tiny(packed_dataset, str(tmp_path), "skip", "debug.nan_at_steps=[2,5]", "run.nan_abort_after=2")
    trainer.fit(cfg)
    sd, _, _ = ck.final_checkpoint(str(tmp_path / "skip"))
    assert sd["progress"]["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in sd["model"].values() if v.is_floating_point())
