"""runs.py: `runs list` / `runs show` over runs trained here (stage 1 -> stage 2, in-process), local and gs://."""

from __future__ import annotations

import os
import shutil

import pytest

from ray_mmd import cli, runs, storage


def _cfg(packed: str, store: str, stage: int):
    from ray_mmd.config import load

    return load(
        None,
        [
            f"stage={stage}",
            f"data.url={packed}",
            f"run.storage={store}",
            f"run.name=s{stage}",
            "run.workers=0",
            "run.progress=false",
            "run.log_every=2",
            f"model.name={'unet' if stage == 1 else 'unet224'}",
            "model.width=4",
            f"data.image_size={32 if stage == 1 else 64}",
            "data.global_batch_size=16",
            "data.chunks=[[0,64,3]]",
            "optim.amp=off",
            "checkpoint.every_steps=2",
            "checkpoint.num_to_keep=3",
            "eval.max_samples=8",
            "eval.batch_size=8",
            *(["parent=s1"] if stage == 2 else []),
        ],
    )


@pytest.fixture(scope="module")
def run_store(packed_dataset, tmp_path_factory) -> str:
    from ray_mmd.train import trainer

    store = str(tmp_path_factory.mktemp("runs"))
    for stage in (1, 2):
        trainer.fit(_cfg(packed_dataset, store, stage))
    return store


def test_runs_list_finds_the_runs_locally_and_on_gcs(run_store, gcs_emulator):
    local = {r["run"]: r for r in runs.list_runs(run_store)}
    assert set(local) == {"s1", "s2"}
    assert (local["s1"]["stage"], local["s2"]["stage"]) == (1, 2)
    assert local["s1"]["reason"] == "final" and local["s1"]["checkpoints"] == 3
    assert isinstance(local["s2"]["best_iou"], float)
    url = gcs_emulator.new_bucket() + "/runs"
    fs, path = storage.filesystem(url)
    fs.put(run_store.rstrip("/") + "/", path, recursive=True)
    fs.invalidate_cache()
    on_gcs = {r["run"]: r for r in runs.list_runs(url)}
    assert {k: {**v, "url": None} for k, v in on_gcs.items()} == {
        k: {**v, "url": None} for k, v in local.items()
    }
    assert "s2" in runs.format_list(list(on_gcs.values()))


def test_runs_show_reports_checkpoints_lineage_metrics_and_a_torn_checkpoint(run_store, tmp_path):
    copy = tmp_path / "s2"
    shutil.copytree(os.path.join(run_store, "s2"), copy)
    s = runs.show_run(str(copy))
    assert s["stage"] == 2 and s["step"] > 0 and s["restarts"] == 0
    assert [c["status"] for c in s["checkpoints"]] == ["verified"] * 3
    assert s["checkpoints"][0]["step"] == s["step"] and all(
        c["bytes"] > 0 and c["time"] for c in s["checkpoints"]
    )
    assert [(x["run"], x["stage"]) for x in s["lineage"]] == [("s2", 2), ("s1", 1)]
    assert s["lineage"][1]["checkpoint"].startswith(os.path.join(run_store, "s1", "checkpoint_"))
    assert s["best"]["eval/iou"] >= s["latest"]["eval/iou"] and s["grid"].endswith("grid_latest.png")
    # tear the newest checkpoint: it is reported torn and the numbers come from the next one
    newest = s["checkpoints"][0]["checkpoint"]
    with open(os.path.join(newest, "state.pt"), "r+b") as f:
        f.truncate(100)
    t = runs.show_run(str(copy))
    assert t["checkpoints"][0]["status"].startswith("torn") and t["checkpoints"][1]["status"] == "verified"
    assert t["step"] == t["checkpoints"][1]["step"]
    assert "torn" in runs.format_show(t) and "s2 (stage 2) <- s1 (stage 1)" in runs.format_show(t)


def test_runs_cli(run_store, tmp_path, capsys):
    assert cli.main(["runs", "list", run_store]) == 0
    assert "s1" in capsys.readouterr().out
    assert cli.main(["runs", "show", os.path.join(run_store, "s1"), "--json"]) == 0
    assert '"stage": 1' in capsys.readouterr().out
    assert cli.main(["runs", "show", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a run directory" in err
