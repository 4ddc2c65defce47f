"""synth.py: the original layout, determinism, and ground truth that matches the pictures."""

import csv
import io
import os
import zipfile

import numpy as np
import pytest
import simplejpeg

from ray_mmd.data import synth
from ray_mmd.data.layout import Layout, decode
from ray_mmd.errors import UserError


def test_layout_is_the_original_one(synth_source):
    files = sorted(os.listdir(synth_source))
    assert "index.csv" in files and "bg.zip" in files
    parts = [f for f in files if f.startswith("fg_bg_mask_")]
    assert len(parts) >= 2 and len([f for f in files if f.startswith("depth_")]) == len(parts)
    with open(os.path.join(synth_source, "index.csv")) as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == synth.COLUMNS
    assert len(rows) == 201
    assert {r[6] for r in rows[1:]} <= set(synth.SCENES)
    with zipfile.ZipFile(os.path.join(synth_source, rows[1][4])) as zf:
        assert rows[1][0] in zf.namelist() and rows[1][1] in zf.namelist()
    with zipfile.ZipFile(os.path.join(synth_source, "bg.zip")) as zf:
        assert len(zf.namelist()) == 4
    # sizes and modes straight from the JPEG headers
    lay = Layout(synth_source)
    b = lay.sample_bytes(0)
    hdr = {k: simplejpeg.decode_jpeg_header(v)[:3] for k, v in b.items()}
    assert hdr["fg_bg"][:2] == (250, 250) and hdr["fg_bg"][2] != "Gray"
    assert hdr["bg"][:2] == (250, 250) and hdr["bg"][2] != "Gray"
    assert hdr["mask"] == (250, 250, "Gray")
    assert hdr["depth"] == (240, 320, "Gray")


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path, tree_digest):
    for name, seed, workers in (("a", 3, 1), ("b", 3, 2), ("c", 4, 1)):
        synth.generate(str(tmp_path / name), 24, bgs=3, fgs=2, seed=seed, workers=workers)
    a, b, c = (tree_digest(str(tmp_path / n)) for n in "abc")
    assert a == b  # byte-identical whether run in one process or two
    assert a["index.csv"] != c["index.csv"] and a["fg_bg_mask_01.zip"] != c["fg_bg_mask_01.zip"]


def test_all_scene_classes_render_distinctly():
    assets = synth.build_assets(len(synth.SCENES), 1, seed=0)
    assert assets.bg_types == list(synth.SCENES)
    means = assets.bg_rgb.reshape(len(synth.SCENES), -1).mean(1)
    assert len(set(np.round(means, 1))) == len(synth.SCENES)
    assert (assets.bg_dist > 0).all()


def test_exact_ground_truth_before_jpeg():
    assets = synth.build_assets(5, 3, seed=1)
    pl = synth.plan(60, 5, 3, seed=1)
    for i in range(60):
        img, mask, depth = synth.render_sample(assets, pl, i)
        b = int(pl["bg"][i])
        sp = assets.sprites[2 * int(pl["fg"][i]) + int(pl["flip"][i])]
        assert mask.sum() == sp.mask.sum() > 500  # the whole sprite is in frame
        # outside the mask the picture is the bg, pixel for pixel
        assert np.array_equal(img[~mask], assets.bg_rgb[b][~mask])
        # the mask is the sprite's silhouette and the pasted pixels are the sprite's
        ys, xs = np.nonzero(mask)
        sy, sx = np.nonzero(sp.mask)
        tight = sp.mask[sy.min() : sy.max() + 1, sx.min() : sx.max() + 1]
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        assert np.array_equal(mask[box], tight)
        assert np.array_equal(
            img[box][tight], sp.rgb[sy.min() : sy.max() + 1, sx.min() : sx.max() + 1][tight]
        )
        # depth: changed only where the fg is, and there strictly nearer (brighter) than the bg behind
        changed = depth != assets.bg_depth[b]
        assert changed.any()
        assert (depth[changed] > assets.bg_depth[b][changed]).all()
        assert changed.sum() <= 1.2 * mask.sum() * (240 * 320) / (250 * 250)


def test_ground_truth_survives_jpeg(synth_source):
    """On the written JPEGs: mask = where fg_bg differs from bg; depth brighter there than the bare scene."""
    lay = Layout(synth_source)
    assets = synth.build_assets(4, 3, seed=0)
    names = {n: i for i, n in enumerate(assets.bg_names)}
    for i in range(0, 200, 10):
        s = lay.sample(i)
        m = s["mask"] > 127
        diff = np.abs(s["fg_bg"].astype(int) - s["bg"].astype(int)).mean(2)
        assert diff[~m].mean() < 4 and diff[m].mean() > 25
        # the mask at depth scale, eroded away from the JPEG-blurred edge
        md = m[(np.arange(240) * 250) // 240][:, (np.arange(320) * 250) // 320]
        core = md & np.roll(md, 3, 0) & np.roll(md, -3, 0) & np.roll(md, 3, 1) & np.roll(md, -3, 1)
        bg_depth = decode(synth.encode_gray(assets.bg_depth[names[lay[i].bg_name]]))
        d = s["depth"].astype(int) - bg_depth.astype(int)
        assert d[core].mean() > 10, i
        assert np.abs(d[~md]).mean() < 3


def test_writes_to_memory_url():
    synth.generate("memory://synth-test/ds", 6, bgs=2, fgs=1, workers=1)
    lay = Layout("memory://synth-test/ds")
    assert len(lay) == 6 and lay.sample(5)["depth"].shape == (240, 320)


@pytest.mark.parametrize("kw", [{"samples": 0}, {"bgs": 0}, {"fgs": 0}])
def test_bad_arguments_are_user_errors(tmp_path, kw):
    args = {"samples": 5, "bgs": 2, "fgs": 1, **kw}
    with pytest.raises(UserError, match="must be >= 1"):
        synth.generate(str(tmp_path / "x"), args.pop("samples"), **args)


def test_jpeg_helpers_round_trip():
    a = (np.arange(250 * 250) % 256).astype(np.uint8).reshape(250, 250)
    g = decode(synth.encode_gray(a))
    assert g.shape == (250, 250) and np.abs(g.astype(int) - a).mean() < 6
    rgb = decode(synth.encode_rgb(np.stack([a] * 3, -1)))
    assert rgb.shape == (250, 250, 3)
    assert io.BytesIO(synth.encode_rgb(np.zeros((8, 8, 3), np.uint8))).getvalue()[:3] == b"\xff\xd8\xff"
