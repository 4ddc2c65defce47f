"""checkpoint.py: files of the whole TrainState, digest verification, fallback past torn checkpoints."""

from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import pytest
import torch

from ray_mmd.train import checkpoint as ck
from ray_mmd.train import state as st


def _state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model(torch.randn(2, 6, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    return st.TrainState(
        model=model,
        optimizer=opt,
        scheduler=sched,
        rng=st.RNGState(),
        progress=st.Progress(stage=2, global_step=7),
        lineage=st.Lineage(run="r", stage=2),
        config=st.Value({"a": 1}),
        ids=st.IdLedger(),
    )


def test_roundtrip_restores_every_part(tmp_path):
    a = _state(0)
    a["ids"].record(3, 2, [1, 2, 3])
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ck.write_checkpoint(str(tmp_path / "c"), a.state_dict(), {"step": 7})
    expect = (random.random(), np.random.rand(), torch.rand(1))
    b = _state(1)
    sd, meta = ck.load_checkpoint(str(tmp_path / "c"))
    b.load_state_dict(sd)
    assert meta["step"] == 7 and b["progress"].global_step == 7 and b["ids"].steps["3"]["ids"] == [1, 2, 3]
    for k, v in a["model"].state_dict().items():
        assert torch.equal(v, b["model"].state_dict()[k])
    assert b["optimizer"].state_dict()["state"][0]["step"] == a["optimizer"].state_dict()["state"][0]["step"]
    assert b["scheduler"].last_epoch == 1
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect


def _save(run, step, seed):
    d = run / ck.checkpoint_dir_name(step, f"t{step}")
    ck.write_checkpoint(str(d), _state(seed).state_dict(), {"step": step})
    return d


@pytest.mark.parametrize("damage", ["truncate", "no_meta", "flip_byte", "garbage"])
def test_torn_latest_falls_back_to_previous(tmp_path, caplog, damage):
    run = tmp_path / "run"
    _save(run, 10, 0)
    _save(run, 20, 1)
    newest = _save(run, 30, 2)
    pt = newest / ck.STATE_FILE
    data = pt.read_bytes()
    if damage == "truncate":
        pt.write_bytes(data[: len(data) // 2])
    elif damage == "no_meta":
        os.remove(newest / ck.META_FILE)
    elif damage == "flip_byte":
        pt.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:  # garbage that matches its (rewritten) digest: torch.load must still reject it
        import hashlib

        pt.write_bytes(b"x" * 50)
        meta = json.loads((newest / ck.META_FILE).read_text())
        meta.update(sha256=hashlib.sha256(b"x" * 50).hexdigest(), bytes=50)
        (newest / ck.META_FILE).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        sd, meta, url = ck.restore_latest(str(run), preferred=str(newest))
    assert meta["step"] == 20 and url.endswith(ck.checkpoint_dir_name(20, "t20"))
    assert "rejected" in caplog.text and "fallback" in caplog.text
    assert ck.list_checkpoints(str(run))[0].endswith("t30")


def test_no_checkpoints_means_none(tmp_path):
    assert ck.restore_latest(str(tmp_path / "nothing")) is None
    with pytest.raises(ck.CheckpointError):
        ck.final_checkpoint(str(tmp_path / "nothing"))


def test_prune_orphans_keeps_the_newest_k_and_the_restored_one(tmp_path):
    """An attempt whose driver died left checkpoints Ray never registered: the next attempt sweeps them."""
    run = tmp_path / "run"
    urls = []
    for step, tok in [(4, "a"), (8, "b"), (12, "c"), (16, "d"), (20, "e")]:
        d = run / ck.checkpoint_dir_name(step, tok)
        ck.write_checkpoint(str(d), {"x": torch.tensor([step])}, {"step": step})
        urls.append(str(d))
    (run / ck.checkpoint_dir_name(20, "e") / ck.STATE_FILE).write_bytes(b"torn")  # newest is torn
    (run / "metrics.jsonl").write_text("{}\n")
    found = ck.restore_latest(str(run))
    assert found is not None and found[2] == urls[3]  # fell back to step 16
    # keep 2: the torn step 20 and step 16 survive by age; 12, 8, 4 go
    doomed = ck.prune_orphans(str(run), 2, keep=found[2])
    assert sorted(doomed) == sorted(urls[:3])
    assert ck.list_checkpoints(str(run)) == [urls[4], urls[3]] and (run / "metrics.jsonl").exists()
    # the restored one is never pruned, even when newer ones fill num_to_keep
    ck.write_checkpoint(str(run / ck.checkpoint_dir_name(24, "f")), {"x": torch.tensor([24])}, {"step": 24})
    ck.prune_orphans(str(run), 2, keep=urls[3])
    assert len(ck.list_checkpoints(str(run))) == 3 and urls[3] in ck.list_checkpoints(str(run))


def test_prune_orphans_leaves_what_ray_registered_to_ray(tmp_path):
    run = tmp_path / "run"
    names = [ck.checkpoint_dir_name(s, "t") for s in (4, 8, 12, 16)]
    for n in names:
        ck.write_checkpoint(str(run / n), {"x": torch.tensor([1])}, {"step": 1})
    (run / ck.RAY_SNAPSHOT).write_text(json.dumps({"checkpoints": [str(run / names[0])]}))
    assert ck.prune_orphans(str(run), 1, keep=None) == [str(run / names[2]), str(run / names[1])]
    assert ck.list_checkpoints(str(run)) == [str(run / names[3]), str(run / names[0])]


def test_snapshot_is_not_changed_by_later_steps():
    """What the upload thread serialises is the state at the save, not what the step makes of it."""
    a = _state(0)
    snap = ck.snapshot(a.state_dict())
    before = {k: v.clone() for k, v in a["model"].state_dict().items()}
    a["model"](torch.randn(2, 6, 8, 8)).sum().backward()
    a["optimizer"].step()  # in place: parameters and the AdamW moments
    a["progress"].best["iou"] = 0.5
    assert any(not torch.equal(v, a["model"].state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, snap["model"][k]) for k, v in before.items())
    assert snap["progress"]["best"] == {} and snap["optimizer"]["state"][0]["step"] == 1


@pytest.mark.slow
def _text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def test_async_checkpoints_verify_and_leave_no_staging_dirs(ray_local, packed_dataset, tmp_path):
    """Through a real Ray Train run (interval checkpoints uploaded in the background, the final one
    too): every kept checkpoint verifies, and the local staging dirs are gone once uploaded."""
    import glob
    import tempfile

    from ray_mmd.config import load
    from ray_mmd.data import manifest as mf
    from ray_mmd.train import trainer
    from tests.conftest import tiny_overrides

    name = f"stage{os.getpid()}"
    over = ["run.workers=1", "run.cpus_per_worker=1", "data.chunks=[[0,80,2]]", "data.global_batch_size=16"]
    cfg = load(None, tiny_overrides(packed_dataset, str(tmp_path), name, *over))
    out = trainer.fit(cfg)
    kept = ck.list_checkpoints(str(tmp_path / name))
    per_epoch = len(mf.load(packed_dataset).sample_ids("train", 0, 80)) // 16
    metas = [ck.load_checkpoint(u)[1] for u in kept]  # each one verifies (digest + torch.load)
    # every 2 steps and at each epoch end, the newest 3 kept: the last is the final one
    saved = sorted({k for k in range(1, 2 * per_epoch + 1) if k % 2 == 0 or k % per_epoch == 0})
    assert [m["step"] for m in metas] == saved[::-1][:3]
    assert out.checkpoint == kept[0]
    assert metas[0]["reason"] == "final" and {m["reason"] for m in metas[1:]} <= {"interval", "epoch"}
    assert glob.glob(os.path.join(tempfile.gettempdir(), f"ray_mmd_ckpt_{name}_*")) == []
    # one owner of the staging dir: Ray did not also try to delete it (a traceback per checkpoint)
    from ray._private.worker import _global_node

    logs = glob.glob(os.path.join(_global_node.get_logs_dir_path(), "**", "*"), recursive=True)
    failed = [
        p for p in logs if os.path.isfile(p) and name in _text(p) and "Failed to delete the local" in _text(p)
    ]
    assert failed == []
