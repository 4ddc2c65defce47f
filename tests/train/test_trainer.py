"""trainer.py on a real local Ray (2 workers): stages 1 -> 2 -> 3 with checkpoints on gs:// (emulator)."""

from __future__ import annotations

import json

import pytest
import torch

from ray_mmd import storage
from ray_mmd.config import load
from ray_mmd.data import manifest as mf
from ray_mmd.train import checkpoint as ck
from ray_mmd.train import trainer
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def _stage(packed: str, bucket: str, stage: int, *extra: str):
    model = "unet" if stage == 1 else "unet224"
    size = 32 if stage == 1 else 128
    return load(
        None,
        tiny_overrides(
            packed,
            f"{bucket}/runs",
            f"s{stage}",
            f"stage={stage}",
            "run.workers=2",
            f"model.name={model}",
            f"data.image_size={size}",
            "data.global_batch_size=16",
            "data.micro_batch_size=4",  # 8 per worker -> 2 accumulated micro-batches
            "data.chunks=[[0,80,1]]",
            "eval.batch_size=8",
            *([f"parent=s{stage - 1}"] if stage > 1 else []),
            *extra,
        ),
    )


def test_stages_1_2_3_on_gcs(ray_local, gcs_emulator, packed_dataset):
    bucket = gcs_emulator.new_bucket()
    outs = [trainer.fit(_stage(packed_dataset, bucket, s)) for s in (1, 2, 3)]
    for s, out in enumerate(outs, start=1):
        assert out.checkpoint and out.checkpoint.startswith(f"{bucket}/runs/s{s}/checkpoint_")
        assert out.metrics["world_size"] == 2 and out.metrics["reason"] == "final"
        assert any(k.startswith("eval/") for k in out.metrics)
    finals = [ck.load_checkpoint(o.checkpoint)[0] for o in outs]
    s1, s2, s3 = (f["model"] for f in finals)
    # stage 2 started from stage 1's final weights and left the spine bitwise unchanged (BN stats too)
    spine2 = {k[len("spine.") :]: v for k, v in s2.items() if k.startswith("spine.")}
    assert spine2.keys() == s1.keys() and all(torch.equal(s1[k], spine2[k]) for k in s1)
    head_changed = [k for k in s2 if k.startswith("head.") and not torch.equal(s2[k], s3[k])]
    assert head_changed
    # stage 3 trains everything
    assert any(
        not torch.equal(s2[k], s3[k]) for k in s2 if k.startswith("spine.") and s2[k].is_floating_point()
    )
    # lineage in every checkpoint: s3 <- s2 <- s1
    lin = finals[2]["lineage"]
    assert lin["run"] == "s3" and lin["parent"]["run"] == "s2" and lin["parent"]["parent"]["run"] == "s1"
    assert lin["parent"]["checkpoint"].startswith(f"{bucket}/runs/s2/checkpoint_")
    assert finals[0]["lineage"]["parent"] is None
    # run directory on gs://: metrics.jsonl, PNG grid, TensorBoard events
    run1 = f"{bucket}/runs/s1"
    lines = [json.loads(x) for x in storage.read_bytes(f"{run1}/metrics.jsonl").decode().splitlines()]
    assert any(x["kind"] == "eval" for x in lines) and any(x["kind"] == "train" for x in lines)
    data = [x for x in lines if x["kind"] == "data"][-1]  # summed over the 2 ranks
    n_train = len(mf.load(packed_dataset).sample_ids("train", 0, 80))
    assert data["data/samples"] == n_train // 16 * 16 and data["data/quarantined"] == 0, data
    assert storage.read_bytes(f"{run1}/grid_latest.png")[:4] == b"\x89PNG"
    fs, path = storage.filesystem(f"{run1}/tensorboard")
    assert any("tfevents" in p for p in fs.ls(path))


def test_nan_streak_stops_the_run_without_ray_retrying_it(ray_local, packed_dataset, tmp_path):
    """A NaN streak is deterministic: the workers end cleanly and the driver raises it (a retry would
    restore the same checkpoint and meet the same streak, max_failures times over)."""
    from ray_mmd.train.metrics import NonFiniteLossError

    nan = ("run.max_failures=3", "debug.nan_at_steps=[0,1]", "run.nan_abort_after=2")
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row ending at global step 1"):
        trainer.fit(_stage(packed_dataset, str(tmp_path), 1, *nan))
    assert ck.list_checkpoints(f"{tmp_path}/runs/s1") == []  # nothing after the streak was saved


def test_resolve_paths_makes_local_paths_absolute_and_keeps_auto(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = trainer.resolve_paths(load(None, ["data.url=data/x", "run.storage=runs"]))
    assert (cfg.data.url, cfg.run.storage) == (str(tmp_path / "data/x"), str(tmp_path / "runs"))
    assert cfg.data.cache_dir == "auto"  # resolved on each worker's node, not a directory named auto
    cfg = trainer.resolve_paths(load(None, ["data.url=gs://b/p", "data.cache_dir=cache"]))
    assert (cfg.data.url, cfg.data.cache_dir) == ("gs://b/p", str(tmp_path / "cache"))
