"""inspect.py: the summary says what the manifest says; the contact sheet shows fg_bg | bg | mask | depth."""

import io

import numpy as np
from PIL import Image

from ray_mmd.data import inspect as insp
from ray_mmd.data import manifest as mf


def test_summary_counts_splits_stats(packed_dataset):
    s = insp.inspect(packed_dataset)
    man = mf.load(packed_dataset)
    assert (s["samples"], s["quarantined"], s["shards"], s["bgs"]) == (200, 0, 7, 4)
    assert s["splits"] == man.split_counts and sum(s["splits"].values()) == 200
    assert s["stats"] == man.stats and s["id_range"] == [0, 200]
    text = insp.format_summary(s)
    assert "200 packed, 0 quarantined" in text and "quarantine none" in text
    assert f"train {man.split_counts['train']}" in text and "depth 320x240" in text


def test_quarantine_summary_groups_reasons(packed_dataset):
    man = mf.load(packed_dataset)
    man.quarantine = [
        {"sample_id": 3, "name": "a.jpg", "reason": "corrupt JPEG (x)", "kind": "corrupt"},
        {"sample_id": 4, "name": "b.jpg", "reason": "member b missing", "kind": "missing"},
        {"sample_id": 9, "name": "c.jpg", "reason": "corrupt JPEG (y)", "kind": "corrupt"},
    ]
    s = insp.summarize(man)
    assert s["quarantined"] == 3 and s["quarantine_by_kind"] == {"corrupt": 2, "missing": 1}
    text = insp.format_summary(s)
    assert "quarantine corrupt 2, missing 1" in text and "#4 b.jpg: member b missing" in text


def test_contact_sheet_columns(packed_dataset, tmp_path):
    png = tmp_path / "sheet.png"
    insp.inspect(packed_dataset, png=str(png), n=3)
    a = np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB")).astype(int)
    t, g = insp.TILE, 2
    assert a.shape == (3 * (t + g), 4 * (t + g), 3)
    tiles = [
        [a[r * (t + g) : r * (t + g) + t, c * (t + g) : c * (t + g) + t] for c in range(4)] for r in range(3)
    ]
    for fg_bg, bg, mask, depth in tiles:
        m = mask.mean(2) > 127
        assert 0.01 < m.mean() < 0.6  # a silhouette, not an empty or full tile
        diff = np.abs(fg_bg - bg).mean(2)
        assert diff[m].mean() > 4 * diff[~m].mean()  # fg_bg and bg differ where the mask is
        assert (depth.std(2) < 1).all() and depth.std() > 5  # grey, with structure
