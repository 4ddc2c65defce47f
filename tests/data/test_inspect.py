"""inspect.py: the summary says what the manifest says; the contact sheet shows fg_bg | bg | mask | depth."""

import io

import numpy as np
from PIL import Image

from ray_mmd.data import inspect as insp
from ray_mmd.data import manifest as mf
from ray_mmd.errors import UserError


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


# ---- bad input through the CLI: one line, exit 2, nothing written outside the root ----------------

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ray_mmd import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def tree(p: Path) -> dict[str, int]:
    """Every file under p with its size: proves nothing was written (or removed) there."""
    return {str(f.relative_to(p)): f.stat().st_size for f in p.rglob("*") if f.is_file()}


@pytest.fixture
def ds(packed_dataset, tmp_path):
    """A private copy of the packed dataset at tmp_path/box/ds, with a decoy file beside it."""
    box = tmp_path / "box"
    shutil.copytree(packed_dataset, box / "ds")
    (box / "outside.parquet").write_bytes((box / "ds" / "bg.parquet").read_bytes())  # a real parquet file
    return box / "ds"


def edit_manifest(ds: Path, fn) -> None:
    d = json.loads((ds / mf.MANIFEST_NAME).read_text())
    fn(d)
    (ds / mf.MANIFEST_NAME).write_text(json.dumps(d))


def one_line_error(capsys, argv: list[str], box: Path) -> str:
    """Run the CLI as a user would; assert exit 2, one stderr line and no file written in `box`."""
    before = tree(box)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ray-mmd: error: "), err
    assert tree(box) == before
    return lines[0]


def _set(path: list, value):
    def fn(d):
        cur = d
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value

    return fn


MANIFEST_CASES = [
    # (id, how the manifest is damaged, text the line must hold)
    ("not-json", lambda ds: (ds / "manifest.json").write_text("{nope"), "not JSON"),
    ("empty-file", lambda ds: (ds / "manifest.json").write_text(""), "not JSON"),
    ("binary", lambda ds: (ds / "manifest.json").write_bytes(b"\xff\xfe\x00\x81"), "not UTF-8"),
    ("a-list", lambda ds: (ds / "manifest.json").write_text("[1, 2]"), "a JSON list, not an object"),
    ("foreign", lambda ds: (ds / "manifest.json").write_text('{"name": "x"}'), "no format_version"),
    ("format-99", lambda ds: edit_manifest(ds, _set(["format_version"], 99)), "manifest format 99 is not 1"),
    ("no-shards", lambda ds: edit_manifest(ds, lambda d: d.pop("shards")), "lacks 'shards'"),
    ("shards-str", lambda ds: edit_manifest(ds, _set(["shards"], "x")), "'shards' is a string, not a list"),
    ("shard-int", lambda ds: edit_manifest(ds, _set(["shards", 0], 7)), "shards[0] is int, not an object"),
    (
        "rows-str",
        lambda ds: edit_manifest(ds, _set(["shards", 1, "rows"], "32")),
        "shards[1].rows is a string",
    ),
    ("no-path", lambda ds: edit_manifest(ds, lambda d: d["shards"][2].pop("path")), "shards[2] lacks 'path'"),
    ("samples-null", lambda ds: edit_manifest(ds, _set(["num_samples"], None)), "'num_samples' is null"),
    ("seed-bool", lambda ds: edit_manifest(ds, _set(["split_seed"], True)), "'split_seed' is bool"),
    ("bg-list", lambda ds: edit_manifest(ds, _set(["bg"], [])), "'bg' is a list, not an object"),
    (
        "sizes",
        lambda ds: edit_manifest(ds, _set(["sizes", "depth"], [320])),
        "sizes['depth'] is not [width, height]",
    ),
    (
        "quarantine",
        lambda ds: edit_manifest(ds, _set(["quarantine"], [{"name": "a"}])),
        "quarantine[0] has no integer",
    ),
    ("id-range", lambda ds: edit_manifest(ds, _set(["shards", 0, "last_id"], -5)), "rows/id range"),
    ("dir", lambda ds: ((ds / "manifest.json").unlink(), (ds / "manifest.json").mkdir()), "cannot read"),
    (
        "escape",
        lambda ds: edit_manifest(ds, _set(["shards", 0, "path"], "../../../../etc/passwd")),
        "leaves its root",
    ),
    (
        "sibling",
        lambda ds: edit_manifest(ds, _set(["shards", 0, "path"], "../outside.parquet")),
        "leaves its root",
    ),
    ("absolute", lambda ds: edit_manifest(ds, _set(["shards", 0, "path"], "/etc/passwd")), "is absolute"),
    (
        "other-bucket",
        lambda ds: edit_manifest(ds, _set(["shards", 0, "path"], "gs://other/x.parquet")),
        "is a URL",
    ),
    ("bg-escape", lambda ds: edit_manifest(ds, _set(["bg", "path"], "../outside.parquet")), "bg: shard path"),
]


@pytest.mark.parametrize("case,damage,expect", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_malformed_manifest_is_one_line(ds, tmp_path, capsys, case, damage, expect):
    damage(ds)
    png = ds / "sheet.png"
    line = one_line_error(capsys, ["data", "inspect", str(ds), "--png", str(png)], tmp_path / "box")
    assert expect in line, line
    assert "manifest.json" in line  # names the file


SHARD_CASES = [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:1000]), "has 1000 bytes, the manifest says"),
    ("empty", lambda p: p.write_bytes(b""), "has 0 bytes"),
    ("missing", lambda p: p.unlink(), "listed in the manifest but missing"),
    ("garbage", lambda p: p.write_bytes(b"\0" * p.stat().st_size), "does not match its sha256"),
]


@pytest.mark.parametrize("case,damage,expect", SHARD_CASES, ids=[c[0] for c in SHARD_CASES])
def test_damaged_shard_png_is_one_line(ds, tmp_path, capsys, case, damage, expect):
    damage(ds / mf.load(str(ds)).shards[0].path)
    line = one_line_error(capsys, ["data", "inspect", str(ds), "--png", str(ds / "s.png")], tmp_path / "box")
    assert expect in line and "shard-00000.parquet" in line and "re-pack" in line, line


def test_damaged_shard_with_matching_manifest_is_one_line(ds, tmp_path, capsys):
    """A truncated shard whose manifest entry was updated to match: parquet itself refuses it."""
    import hashlib

    p = ds / mf.load(str(ds)).shards[0].path
    p.write_bytes(p.read_bytes()[:-100])
    data = p.read_bytes()
    edit_manifest(ds, _set(["shards", 0, "bytes"], len(data)))
    edit_manifest(ds, _set(["shards", 0, "sha256"], hashlib.sha256(data).hexdigest()))
    line = one_line_error(capsys, ["data", "inspect", str(ds), "--png", str(ds / "s.png")], tmp_path / "box")
    assert "is not a readable shard" in line, line


def test_escaping_shard_is_refused_before_any_read(ds, tmp_path):
    """The escape is caught when the manifest is read, so no reader (stream, cache) can open it."""
    edit_manifest(ds, _set(["shards", 3, "path"], "../outside.parquet"))
    with pytest.raises(UserError, match=r"shards\[3\]: shard path '../outside.parquet' leaves its root"):
        mf.load(str(ds))


def test_png_into_a_directory_is_one_line(ds, tmp_path, capsys):
    (tmp_path / "box" / "adir").mkdir()
    line = one_line_error(
        capsys, ["data", "inspect", str(ds), "--png", str(tmp_path / "box" / "adir")], tmp_path / "box"
    )
    assert "cannot write the contact sheet" in line, line


def test_no_manifest_is_one_line(tmp_path, capsys):
    (tmp_path / "box").mkdir()
    line = one_line_error(capsys, ["data", "inspect", str(tmp_path / "box" / "typo")], tmp_path / "box")
    assert "no manifest.json" in line and "ray-mmd data pack" in line, line


def test_escaping_manifest_on_gcs_is_one_line(packed_dataset, to_gcs, capsys):
    """Same confinement on gs://: a shard path into another bucket of the same project is refused."""
    url = to_gcs(packed_dataset)
    from ray_mmd import storage

    d = json.loads(storage.read_bytes(url + "/manifest.json"))
    d["shards"][0]["path"] = "../../victim-bucket/secret.parquet"
    storage.write_bytes_atomic(url + "/manifest.json", json.dumps(d).encode())
    rc = cli.main(["data", "inspect", url, "--png", url + "/s.png"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "leaves its root" in err, err
    assert not storage.exists(url + "/s.png")


def test_subprocess_not_json_has_no_traceback(ds, tmp_path):
    """As typed in a shell: exactly one line on stderr, exit status 2."""
    (ds / "manifest.json").write_text("[]")
    r = subprocess.run(
        [sys.executable, "-m", "ray_mmd.cli", "data", "inspect", str(ds)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "a JSON list, not an object" in r.stderr, r.stderr


def test_missing_bucket_names_the_bucket_not_the_manifest(gcs_emulator, capsys):
    rc = cli.main(["data", "inspect", "gs://no-such-bucket-insp/ds"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "bucket gs://no-such-bucket-insp does not exist" in err and "dataset URL" in err, err
