"""infer.py, infer_batch.py, export.py: eval, predict (one pair, batch on a real local Ray), export.

One checkpoint is trained here once (the demo config at width 4, 32 px, in-process) and shared.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ray_mmd import cli, infer, storage
from ray_mmd.data import manifest as mf
from ray_mmd.data.transforms import decode_image, resize_u8
from ray_mmd.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def trained(packed_dataset, tmp_path_factory) -> str:
    """Run dir of a stage-1 run trained with jobs/configs/demo.yaml at width 4 (in-process)."""
    from ray_mmd.config import load
    from ray_mmd.train import trainer

    runs = tmp_path_factory.mktemp("runs")
    cfg = load(
        str(ROOT / "jobs/configs/demo.yaml"),
        [
            f"data.url={packed_dataset}",
            f"run.storage={runs}",
            "run.name=tiny",
            "run.workers=0",
            "run.progress=false",
            "model.width=4",
            f"data.image_size={SIZE}",
            "data.chunks=[[0,200,2]]",
            "eval.max_samples=16",
            "checkpoint.every_steps=4",
        ],
    )
    trainer.fit(cfg)
    return str(runs / "tiny")


@pytest.fixture(scope="module")
def other_dataset(packed_factory) -> str:
    """A second packed set from another seed: its stats differ from the training data's."""
    return packed_factory(40, 2, 7)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ---- loading --------------------------------------------------------------------------------------


def test_checkpoint_carries_its_normalisation_and_model(trained, packed_dataset):
    loaded = infer.load_model(trained)
    stats = mf.load(packed_dataset).stats
    assert (loaded.name, loaded.width, loaded.size) == ("unet", 4, SIZE)
    assert loaded.stats == {"fg_bg": stats["fg_bg"], "bg": stats["bg"]}
    assert loaded.stats_from == "checkpoint" and "/checkpoint_" in loaded.source


def test_old_checkpoint_falls_back_to_its_training_manifest(trained, tmp_path, caplog):
    import shutil

    src = infer.load_model(trained).source
    old = tmp_path / os.path.basename(src)
    shutil.copytree(src, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["inference"]  # as written before checkpoints carried it
    (old / "meta.json").write_text(json.dumps(meta))
    loaded = infer.load_model(str(old))
    assert loaded.stats_from.startswith("manifest of ") and "predates stored normalisation" in caplog.text
    assert {k: loaded.stats[k] for k in ("fg_bg", "bg")} == infer.load_model(trained).stats


# ---- eval -----------------------------------------------------------------------------------------


def _direct_metrics(run: str, data: str, train_stats: dict) -> tuple[dict, dict]:
    """One sample at a time, metrics by their definitions in numpy: overall and per bg_type."""
    from ray_mmd.train import checkpoint as st

    state, meta, _ = st.final_checkpoint(run)
    model = build_model("unet", width=4)
    model.load_state_dict(state["model"])
    model.eval()
    mean = torch.tensor(train_stats["fg_bg"]["mean"] + train_stats["bg"]["mean"]).view(1, 6, 1, 1)
    std = torch.tensor(train_stats["fg_bg"]["std"] + train_stats["bg"]["std"]).view(1, 6, 1, 1)
    man = mf.load(data)
    test = set(man.sample_ids("test").tolist())
    bgt = pq.read_table(man.url(man.bg.path))
    bgs = {
        b: resize_u8([decode_image(d, SIZE, False)], SIZE)[0]
        for b, d in zip(bgt["bg_id"].to_pylist(), bgt["image"].to_pylist(), strict=True)
    }
    btype = dict(zip(bgt["bg_id"].to_pylist(), bgt["bg_type"].to_pylist(), strict=True))
    groups: dict[str, dict[str, list]] = {}
    for s in man.shards:
        t = pq.read_table(man.url(s.path))
        for r in t.to_pylist():
            if r["sample_id"] not in test:
                continue
            fg = resize_u8([decode_image(r["fg_bg"], SIZE, False)], SIZE)[0]
            m = resize_u8([decode_image(r["mask"], SIZE, True)], SIZE)[0, 0].numpy() / 255.0
            d = (
                resize_u8([decode_image(r["depth"], SIZE, True)], SIZE)[0, 0].numpy().astype(np.float64)
                / 255.0
            )
            x = torch.cat([fg, bgs[r["bg_id"]]])[None].float() / 255.0
            with torch.no_grad():
                y = model((x - mean) / std)[0]
            p_mask = y[0].numpy() >= 0
            p_depth = np.maximum(torch.sigmoid(y[1]).double().numpy(), 1e-3)
            g = m >= 0.5
            inter, union = (p_mask & g).sum(), (p_mask | g).sum()
            tot = p_mask.sum() + g.sum()
            valid = d > 1e-3
            ratio = np.maximum(p_depth / np.where(valid, d, 1), np.where(valid, d, 1) / p_depth)[valid]
            rec = {
                "iou": inter / union if union else 1.0,
                "dice": 2 * inter / tot if tot else 1.0,
                "abs": np.abs(p_depth - d)[valid] / d[valid],
                "sq": (p_depth - d)[valid] ** 2,
                "ratio": ratio,
            }
            for key in ("overall", btype[r["bg_id"]]):
                grp = groups.setdefault(key, {k: [] for k in rec})
                for k, v in rec.items():
                    grp[k].append(v)

    def summarise(gr):
        abs_, sq, ratio = (np.concatenate(gr[k]) for k in ("abs", "sq", "ratio"))
        return {
            "iou": np.mean(gr["iou"]),
            "dice": np.mean(gr["dice"]),
            "abs_rel": abs_.mean(),
            "rmse": np.sqrt(sq.mean()),
            "delta1": (ratio < 1.25).mean(),
            "images": len(gr["iou"]),
        }

    overall = summarise(groups.pop("overall"))
    return overall, {k: summarise(v) for k, v in groups.items()}


@pytest.mark.parametrize("which", ["training", "other"])
def test_eval_equals_a_direct_computation_with_the_training_stats(
    which, trained, packed_dataset, other_dataset, one_thread
):
    data = packed_dataset if which == "training" else other_dataset
    loaded = infer.load_model(trained)
    result, grid = infer.evaluate(loaded, data, "test", batch_size=7, grid_rows=3)
    overall, per = _direct_metrics(trained, data, mf.load(packed_dataset).stats)
    assert set(result["per_bg_type"]) == set(per) and len(per) >= 2
    for got, want in [(result["overall"], overall)] + [(result["per_bg_type"][k], per[k]) for k in per]:
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert grid[:4] == b"\x89PNG" and len(result["best"]) == 3
    assert result["best"][0]["iou"] >= result["worst"][-1]["iou"] >= result["worst"][0]["iou"]


def test_eval_of_another_dataset_differs_with_its_own_stats(trained, packed_dataset, other_dataset):
    """The point of storing the stats: normalising with the eval set's stats would give other numbers."""
    ours = infer.load_model(trained)
    theirs = infer.load_model(trained)
    theirs.net = infer.Normalized(theirs.net.model, mf.load(other_dataset).stats)
    a, _ = infer.evaluate(ours, other_dataset, "all")
    b, _ = infer.evaluate(theirs, other_dataset, "all")
    assert mf.load(other_dataset).stats["fg_bg"] != mf.load(packed_dataset).stats["fg_bg"]
    assert a["overall"]["rmse"] != b["overall"]["rmse"]


def test_eval_cli_writes_json_and_grid_for_a_chunk(trained, packed_dataset, tmp_path, capsys):
    rc = cli.main(
        [
            "eval",
            "--checkpoint",
            trained,
            "--data",
            packed_dataset,
            "--chunk",
            "0:100",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["chunk"] == [0, 100] and res["overall"]["images"] == len(
        mf.load(packed_dataset).sample_ids("test", 0, 100)
    )
    assert _png(tmp_path / "eval_grid.png").ndim == 3 and "overall" in capsys.readouterr().out


# ---- predict (one pair) ---------------------------------------------------------------------------


def test_predict_writes_files_of_the_inputs_size(trained, tmp_path):
    rng = np.random.default_rng(0)
    fg, bg = (rng.integers(0, 256, (53, 77, 3), dtype=np.uint8) for _ in range(2))
    (tmp_path / "scene.jpg").write_bytes(_jpeg(fg))
    Image.fromarray(bg).save(tmp_path / "bg.png")
    loaded = infer.load_model(trained)
    urls = infer.predict_pair(
        loaded, str(tmp_path / "scene.jpg"), str(tmp_path / "bg.png"), str(tmp_path / "out")
    )
    assert [os.path.basename(u) for u in urls] == [f"scene_{s}" for s in infer.OUTPUT_SUFFIXES]
    mask, prob, depth, color = (_png(u) for u in urls)
    assert all(a.shape[:2] == (53, 77) for a in (mask, prob, depth, color)) and color.shape[2] == 3
    assert set(np.unique(mask)) <= {0, 255}
    # the depth PNG is the model's depth at stage size, brought back to the input's size
    fg_s = decode_image((tmp_path / "scene.jpg").read_bytes(), SIZE, False)
    x = infer.inputs_at_stage_size([fg_s], [bg], SIZE)
    logits, d = loaded(x)
    want = torch.nn.functional.interpolate(d, size=(53, 77), mode="bilinear", align_corners=False)[0, 0]
    assert np.abs(depth.astype(float) - want.numpy() * 255).max() <= 1.0
    want_mask = (
        torch.nn.functional.interpolate(torch.sigmoid(logits), size=(53, 77), mode="bilinear")[0, 0] >= 0.5
    )
    assert (mask == 255).tolist() == want_mask.tolist()


def _err(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ray-mmd: error: "), err
    return err


def test_bad_input_is_one_line_each(trained, tmp_path, capsys):
    rng = np.random.default_rng(1)
    (tmp_path / "a.jpg").write_bytes(_jpeg(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)))
    (tmp_path / "b.jpg").write_bytes(_jpeg(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)))
    (tmp_path / "text.jpg").write_text("not a picture")
    (tmp_path / "empty" / "fg_bg").mkdir(parents=True)
    blocked = tmp_path / "file"
    blocked.write_text("x")
    pair = ["--fg-bg", str(tmp_path / "a.jpg"), "--bg", str(tmp_path / "a.jpg")]
    ck = ["predict", "--checkpoint", trained]
    assert "is not a checkpoint" in _err(
        capsys, ["predict", "--checkpoint", str(tmp_path), *pair, "--out", "o"]
    )
    assert "not a checkpoint or a model exported" in _err(
        capsys, ["predict", "--checkpoint", str(tmp_path / "a.jpg"), *pair, "--out", "o"]
    )
    assert "not unet at width 16" in _err(capsys, [*ck, "--width", "16", *pair, "--out", str(tmp_path / "o")])
    assert "text.jpg is not an image" in _err(
        capsys, [*ck, "--fg-bg", str(tmp_path / "text.jpg"), "--bg", str(tmp_path / "a.jpg"), "--out", "o"]
    )
    assert "is 40x40 but bg" in _err(
        capsys, [*ck, "--fg-bg", str(tmp_path / "a.jpg"), "--bg", str(tmp_path / "b.jpg"), "--out", "o"]
    )
    assert "cannot write to" in _err(capsys, [*ck, *pair, "--out", str(blocked / "sub")])
    assert "no fg_bg images in" in _err(
        capsys, [*ck, "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )


# ---- export ---------------------------------------------------------------------------------------


def test_export_runs_with_plain_torch_and_matches_the_checkpoint(trained, tmp_path):
    from ray_mmd.export import export_model

    out = tmp_path / "model.pt2"
    meta = export_model(trained, str(out))
    assert meta["stats"] == infer.load_model(trained).stats
    x = torch.rand(3, 6, SIZE, SIZE)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys; sys.modules['ray_mmd'] = None\n"  # importing ray_mmd would now fail
        "import torch\n"
        "ep = torch.export.load(sys.argv[1]); x = torch.load(sys.argv[2])\n"
        "torch.save(ep.module()(x).detach(), sys.argv[3])\n"
        "assert not any(m.startswith('ray_mmd') for m in sys.modules if sys.modules[m] is not None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-I", "-c", code, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=120,
    )
    y = torch.load(tmp_path / "y.pt")
    want = infer.load_model(trained).net(x).detach()
    assert y.shape == (3, 2, SIZE, SIZE) and torch.allclose(y, want, atol=1e-5)
    # and ray-mmd reads it back as a --checkpoint
    assert infer.load_model(str(out)).stats_from == "export"


# ---- batch predict on Ray Data --------------------------------------------------------------------


def _outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def _expected(keys) -> list[str]:
    return sorted(f"{k}_{s}" for k in keys for s in infer.OUTPUT_SUFFIXES)


def test_batch_predict_packed_writes_one_output_per_input_and_reruns_write_nothing(
    ray_local, trained, packed_dataset, tmp_path
):
    from ray_mmd.infer_batch import batch_predict, packed_key

    out = tmp_path / "out"
    ids = mf.load(packed_dataset).sample_ids("test")
    r = batch_predict(trained, packed_dataset, str(out), batch_size=8, split="test", progress=False)
    assert r == {"inputs": len(ids), "skipped": 0, "written": len(ids), "failed": 0}
    assert _outputs(out) == _expected(packed_key(i) for i in ids)
    assert _png(out / f"{packed_key(ids[0])}_mask.png").shape == (250, 250)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = batch_predict(trained, packed_dataset, str(out), batch_size=8, split="test", progress=False)
    assert r["written"] == 0 and r["skipped"] == len(ids)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_batch_predict_killed_midway_then_rerun_has_every_output_once(
    ray_local, trained, packed_dataset, tmp_path
):
    from ray_mmd.infer_batch import batch_predict, packed_key

    out = tmp_path / "out"
    ids = mf.load(packed_dataset).sample_ids("all")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    argv = [
        sys.executable,
        "-m",
        "ray_mmd.cli",
        "predict",
        "--checkpoint",
        trained,
        "--input",
        packed_dataset,
    ]
    argv += ["--out", str(out), "--batch-size", "4", "--debug-sleep-per-batch", "0.5"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and sum(n.endswith("depth_color.png") for n in os.listdir(out)) >= 12:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(2)  # actors of the killed driver are torn down by Ray; a write in flight may still land
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if ".tmp-" not in p.name}
    done = {n[: -len("_depth_color.png")] for n in written if n.endswith("_depth_color.png")}
    assert 12 <= len(done) < len(ids)
    r = batch_predict(trained, packed_dataset, str(out), batch_size=8, progress=False)
    assert r["failed"] == 0 and r["skipped"] >= len(done) and r["written"] + r["skipped"] == len(ids)
    assert _outputs(out) == _expected(packed_key(i) for i in ids)  # each once, no leftovers
    for k in done:  # nothing written before the kill was lost or redone
        assert (out / f"{k}_depth_color.png").stat().st_mtime_ns == written[f"{k}_depth_color.png"]


def test_batch_predict_folder_on_gcs(ray_local, trained, gcs_emulator, tmp_path):
    from ray_mmd.infer_batch import batch_predict

    bucket = gcs_emulator.new_bucket()
    rng = np.random.default_rng(2)
    for i, (h, w) in enumerate([(40, 60), (64, 64), (30, 50)]):
        storage.write_bytes_atomic(
            f"{bucket}/in/fg_bg/p{i}.jpg", _jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        )
        storage.write_bytes_atomic(
            f"{bucket}/in/bg/p{i}.jpg", _jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        )
    r = batch_predict(trained, f"{bucket}/in", f"{bucket}/out", batch_size=2, progress=False)
    assert r["written"] == 3 and r["failed"] == 0
    fs, path = storage.filesystem(f"{bucket}/out")
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    assert names == _expected(["p0", "p1", "p2"])
    depth = np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{bucket}/out/p2_depth.png"))))
    assert depth.shape == (30, 50)
