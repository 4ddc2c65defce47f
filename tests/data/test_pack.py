"""pack.py: round trip, bg once, stats, resumability after SIGKILL, gs://, and every bad input quarantined."""

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_mmd import storage
from ray_mmd.data import manifest as mf
from ray_mmd.data import pack, synth
from ray_mmd.data.layout import Layout, decode
from ray_mmd.errors import UserError


def read_shards(man: mf.Manifest) -> list[dict]:
    rows = []
    for s in man.shards:
        pafs, path = storage.pyarrow_filesystem(man.url(s.path))
        t = pq.read_table(path, filesystem=pafs)
        assert t.schema.equals(mf.SHARD_SCHEMA)
        rows += t.to_pylist()
    return rows


def read_bgs(man: mf.Manifest) -> list[dict]:
    pafs, path = storage.pyarrow_filesystem(man.url(man.bg.path))
    t = pq.read_table(path, filesystem=pafs)
    assert t.schema.equals(mf.BG_SCHEMA)
    return t.to_pylist()


def test_round_trip_every_byte(packed_dataset, synth_source):
    man = mf.load(packed_dataset)
    lay = Layout(synth_source)
    rows = read_shards(man)
    bgs = {b["bg_id"]: b for b in read_bgs(man)}
    assert [r["sample_id"] for r in rows] == list(range(200)) and man.num_samples == 200
    for r in rows:
        src = lay.sample_bytes(r["sample_id"])
        row = lay[r["sample_id"]]
        assert (r["fg_bg"], r["mask"], r["depth"]) == (src["fg_bg"], src["mask"], src["depth"])
        assert bgs[r["bg_id"]]["image"] == src["bg"] and bgs[r["bg_id"]]["name"] == row.bg_name
        assert (r["image_name"], r["bg_type"], r["bg_name"]) == (row.image_name, row.bg_type, row.bg_name)
    for s in man.shards:  # checksums and id ranges in the manifest are the files'
        raw = open(os.path.join(packed_dataset, s.path), "rb").read()
        assert hashlib.sha256(raw).hexdigest() == s.sha256 and len(raw) == s.bytes
        assert s.rows == s.last_id - s.first_id + 1 <= 32
    assert [s.first_id for s in man.shards] == list(range(0, 200, 32))


def test_bg_stored_once(packed_dataset):
    man = mf.load(packed_dataset)
    bgs = read_bgs(man)
    assert len(bgs) == man.bg.rows == 4
    assert len({b["name"] for b in bgs}) == 4 and [b["bg_id"] for b in bgs] == [0, 1, 2, 3]
    assert "bg" not in mf.SHARD_SCHEMA.names  # shards carry only the bg id
    # the ids used by samples cover every stored bg (no orphan, no copy)
    assert {r["bg_id"] for r in read_shards(man)} == {0, 1, 2, 3}


def test_manifest_splits_and_stats(packed_dataset, synth_source):
    man = mf.load(packed_dataset)
    train, test = man.sample_ids("train"), man.sample_ids("test")
    assert len(train) + len(test) == 200 and not set(train) & set(test)
    assert man.split_counts == {"train": len(train), "test": len(test)}
    assert 0.15 < len(test) / 200 < 0.45
    assert man.sizes == {"fg_bg": [250, 250], "bg": [250, 250], "mask": [250, 250], "depth": [320, 240]}
    # stats against a direct computation over every pixel of every image
    lay = Layout(synth_source)
    acc = {}  # kind -> [pixel count, sum, sum of squares] over every pixel
    for i in range(200):
        for k, a in lay.sample(i).items():
            x = a.reshape(-1, 3 if a.ndim == 3 else 1).astype(np.float64) / 255
            n, s1, s2 = acc.get(k, (0, 0.0, 0.0))
            acc[k] = (n + len(x), s1 + x.sum(0), s2 + (x * x).sum(0))
    for k, (n, s1, s2) in acc.items():
        mean = s1 / n
        assert np.allclose(man.stats[k]["mean"], mean, atol=3e-3), k
        assert np.allclose(man.stats[k]["std"], np.sqrt(s2 / n - mean**2), atol=3e-3), k
    assert 0.02 < man.stats["mask"]["mean"][0] < 0.3


def test_rerun_skips_verified_shards_and_redoes_a_tampered_one(synth_source, tmp_path, monkeypatch):
    dst = str(tmp_path / "p")
    first = pack.pack(synth_source, dst, shard_size=64, workers=1)
    stamp = {p: os.stat(os.path.join(dst, p)).st_mtime_ns for p in (s.path for s in first.shards)}
    with open(os.path.join(dst, first.shards[1].path), "r+b") as f:  # corrupt one shard in place
        f.seek(100)
        f.write(b"XXXX")
    calls = []
    real = pack._pack_shard
    monkeypatch.setattr(pack, "_pack_shard", lambda t: calls.append(t["k"]) or real(t))
    again = pack.pack(synth_source, dst, shard_size=64, workers=1)
    assert calls == [1]
    assert again.to_json() == first.to_json()
    for s in first.shards:
        if s.path != first.shards[1].path:
            assert os.stat(os.path.join(dst, s.path)).st_mtime_ns == stamp[s.path]
    # a different shard size is a different pack: nothing stale is trusted
    calls.clear()
    third = pack.pack(synth_source, dst, shard_size=50, workers=1)
    assert calls == [0, 1, 2, 3] and [s.rows for s in third.shards] == [50] * 4


_SLOW_PACK = """
import sys, time
from ray_mmd.data import pack
real = pack._pack_shard
def slow(t):
    r = real(t)
    time.sleep(0.4)  # room for the test to kill us between shards
    return r
pack._pack_shard = slow
pack.pack(sys.argv[1], sys.argv[2], shard_size=32, workers=1)
"""


def test_killed_packer_leaves_no_manifest_and_rerun_completes(synth_source, tmp_path, monkeypatch):
    dst = tmp_path / "p"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PACK, synth_source, str(dst)])
    try:
        deadline = time.monotonic() + 120
        while not list((dst / "shards").glob("shard-0000[12].json")) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (dst / mf.MANIFEST_NAME).exists()
    with pytest.raises(UserError, match="no manifest.json"):
        mf.load(str(dst))
    done = sorted(int(p.name[6:11]) for p in (dst / "shards").glob("shard-*.json"))
    assert 1 <= len(done) < 7
    calls = []
    real = pack._pack_shard
    monkeypatch.setattr(pack, "_pack_shard", lambda t: calls.append(t["k"]) or real(t))
    man = pack.pack(synth_source, str(dst), shard_size=32, workers=1)
    assert calls == [k for k in range(7) if k not in done]  # verified shards were not redone
    assert mf.load(str(dst)).to_json() == man.to_json() and man.num_samples == 200
    assert not [p for p in dst.rglob("*") if ".tmp-" in p.name]


def test_parallel_pack_matches_serial(synth_source, packed_dataset, tmp_path):
    man = pack.pack(synth_source, str(tmp_path / "par"), shard_size=32, workers=2)
    ref = mf.load(packed_dataset)
    assert [s.sha256 for s in man.shards] == [s.sha256 for s in ref.shards]
    assert man.stats == ref.stats and man.bg.sha256 == ref.bg.sha256


def test_gs_to_gs_on_the_emulator(gcs_emulator, tmp_path):
    bucket = gcs_emulator.new_bucket()
    synth.generate(bucket + "/src", 20, bgs=3, fgs=2, seed=5, workers=1)
    man = pack.pack(bucket + "/src", bucket + "/packed", shard_size=8, workers=1)
    again = mf.load(bucket + "/packed")
    assert again.num_samples == 20 and len(again.shards) == 3
    local = tmp_path / "src"
    synth.generate(str(local), 20, bgs=3, fgs=2, seed=5, workers=1)
    lay = Layout(str(local))
    rows = read_shards(again)
    assert all(r["fg_bg"] == lay.sample_bytes(r["sample_id"])["fg_bg"] for r in rows)
    assert man.stats == pack.pack(str(local), str(tmp_path / "p"), shard_size=8, workers=1).stats


def test_missing_bucket_and_bad_urls_are_user_errors(gcs_emulator, synth_source, tmp_path):
    with pytest.raises(UserError, match="bucket gs://no-such-bucket-q1 does not exist"):
        pack.pack("gs://no-such-bucket-q1/src", str(tmp_path / "p"))
    with pytest.raises(UserError, match="bucket gs://no-such-bucket-q2 does not exist"):
        pack.pack(synth_source, "gs://no-such-bucket-q2/p")
    with pytest.raises(UserError, match="not found"):
        pack.pack(str(tmp_path / "nothing"), str(tmp_path / "p"))
    for kw, msg in (({"shard_size": 0}, "shard-size"), ({"test_fraction": 1.0}, "test-fraction")):
        with pytest.raises(UserError, match=msg):
            pack.pack(synth_source, str(tmp_path / "p"), **kw)


def test_csv_missing_column_is_a_user_error(synth_source, tmp_path):
    shutil.copytree(synth_source, tmp_path / "src")
    p = tmp_path / "src" / "index.csv"
    p.write_text(p.read_text().replace(",BGType,", ",Type,", 1))
    with pytest.raises(UserError, match=r"lacks column\(s\) BGType"):
        pack.pack(str(tmp_path / "src"), str(tmp_path / "p"))


# ---- a source with every per-sample fault in the issue -----------------------------------------


def _rewrite_zip(path, change):
    """Rebuild a zip with change(name, data) -> list of (name, data, compression)."""
    with zipfile.ZipFile(path) as zf:
        items = [(n, zf.read(n)) for n in zf.namelist()]
    with zipfile.ZipFile(path, "w") as zf:
        for n, d in items:
            for name, data, comp in change(n, d):
                zf.writestr(zipfile.ZipInfo(name), data, compress_type=comp)


@pytest.fixture(scope="module")
def bad_source(synth_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "src"
    shutil.copytree(synth_source, root)
    rows = list(csv.reader(open(root / "index.csv")))
    hdr, body = rows[0], rows[1:]
    col = {c: hdr.index(c) for c in hdr}
    png = io.BytesIO()
    Image.fromarray(np.full((250, 250, 3), 90, np.uint8)).save(png, format="PNG")
    rgb_mask = synth.encode_rgb(np.zeros((250, 250, 3), np.uint8))
    small = synth.encode_rgb(np.zeros((200, 200, 3), np.uint8))
    expect = {}  # sample_id -> kind
    edits = {}  # (zip, member) -> new bytes or None (drop)
    for i, (field, zipcol, kind, data) in {
        3: ("ImageName", "BaseImageFName", "corrupt", "truncate"),
        5: ("MaskName", "BaseImageFName", "empty", b""),
        7: ("Depthname", "DepthImageFName", "missing", None),
        9: ("ImageName", "BaseImageFName", "shape", small),
        11: ("MaskName", "BaseImageFName", "shape", rgb_mask),
        19: ("ImageName", "BaseImageFName", None, png.getvalue()),  # PNG in a .jpg member: fine
    }.items():
        edits[(body[i][col[zipcol]], body[i][col[field]])] = data
        if kind:
            expect[i] = kind
    body[13][col["BaseImageFName"]] = "no_such_part.zip"
    expect[13] = "missing"
    # zip-slip name: a valid image under a hostile member name
    slip_zip, slip_old = body[15][col["BaseImageFName"]], body[15][col["ImageName"]]
    body[15][col["ImageName"]] = "../../x"
    # zip bomb: declared 20 MB, a few KB on disk
    bomb_zip, bomb_next_to = body[17][col["BaseImageFName"]], body[17][col["ImageName"]]
    body[17][col["ImageName"]] = "fg_bg/bomb.jpg"
    expect[17] = "oversize"

    def change_for(zname):
        def change(n, d):
            if n == slip_old and zname == slip_zip:
                return [(n, d, zipfile.ZIP_STORED), ("../../x", d, zipfile.ZIP_STORED)]
            out = []
            if (zname, n) in edits:
                new = edits[(zname, n)]
                if new is None:
                    return []
                d = d[: len(d) // 2] if new == "truncate" else new
            out.append((n, d, zipfile.ZIP_STORED))
            if zname == bomb_zip and n == bomb_next_to:
                out.append(("fg_bg/bomb.jpg", b"\xff\xd8\xff" + b"\0" * (20 << 20), zipfile.ZIP_DEFLATED))
            return out

        return change

    for z in {z for z, _ in edits} | {slip_zip, bomb_zip}:
        _rewrite_zip(root / z, change_for(z))
    with open(root / "index.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([hdr] + body)
    return str(root), expect


def test_every_bad_input_is_quarantined_not_packed(bad_source, tmp_path, monkeypatch, tree_digest):
    src, expect = bad_source
    before = tree_digest(src)
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")  # a `../../x` written anywhere relative would land in tmp_path
    man = pack.pack(src, str(tmp_path / "p"), shard_size=32, max_bad_fraction=0.05, workers=1)
    got = {q["sample_id"]: q["kind"] for q in man.quarantine}
    assert got == expect, man.quarantine
    assert all(q["reason"] and q["name"] for q in man.quarantine)
    ids = [r["sample_id"] for r in read_shards(man)]
    assert man.num_samples == len(ids) == 200 - len(expect) and not set(ids) & set(expect)
    assert set(man.sample_ids("all")) == set(ids)
    assert json.loads(open(tmp_path / "p" / "quarantine.json").read()) == man.quarantine
    # zip-slip: packed as a name, nothing created outside
    slip = [r for r in read_shards(man) if r["sample_id"] == 15][0]
    assert slip["image_name"] == "../../x" and decode(slip["fg_bg"]).shape == (250, 250, 3)
    assert not (tmp_path / "x").exists() and sorted(os.listdir(tmp_path)) == ["a", "p"]
    # PNG content under a .jpg name was recognised by its bytes and kept as is
    png_row = [r for r in read_shards(man) if r["sample_id"] == 19][0]
    assert png_row["fg_bg"][:4] == b"\x89PNG"
    assert tree_digest(src) == before  # the source was never modified


def test_past_the_bad_fraction_pack_aborts_with_one_line_and_no_manifest(bad_source, tmp_path, tree_digest):
    src, expect = bad_source
    before = tree_digest(src)
    with pytest.raises(UserError, match=r"more than 1\.00% of 200 samples are bad") as e:
        pack.pack(src, str(tmp_path / "p"), shard_size=32, workers=1)  # default limit 1% = 2 samples
    assert "\n" not in str(e.value) and "--max-bad-fraction" in str(e.value)
    assert not (tmp_path / "p" / mf.MANIFEST_NAME).exists()
    assert json.loads((tmp_path / "p" / "quarantine.json").read_text())  # the report is there to read
    assert tree_digest(src) == before


def test_bad_bg_quarantines_its_samples(synth_source, tmp_path):
    shutil.copytree(synth_source, tmp_path / "src")
    first = Layout(str(tmp_path / "src"))[0].bg_name
    _rewrite_zip(
        tmp_path / "src" / "bg.zip",
        lambda n, d: [(n, d[:100] if n == first else d, zipfile.ZIP_STORED)],
    )
    man = pack.pack(
        str(tmp_path / "src"), str(tmp_path / "p"), shard_size=64, max_bad_fraction=1.0, workers=1
    )
    lay = Layout(str(tmp_path / "src"))
    users = {i for i in range(200) if lay[i].bg_name == first}
    assert {q["sample_id"] for q in man.quarantine} == users and {q["kind"] for q in man.quarantine} == {"bg"}
    assert man.bg.rows == 3 and man.num_samples == 200 - len(users)


def test_make_synthetic_generates_and_packs(tmp_path):
    man = pack.make_synthetic(str(tmp_path / "d"), 50, 20, seed=2, bgs=3, fgs=2, workers=1, test_fraction=0.5)
    assert man.num_samples == 50 and [s.rows for s in man.shards] == [20, 20, 10]
    assert man.test_fraction == 0.5 and mf.load(str(tmp_path / "d")).bg.rows == 3
    with pytest.raises(TypeError, match="unknown"):
        pack.make_synthetic(str(tmp_path / "e"), 5, 5, colour="red")


# ---- the destination: another dataset, a foreign file, a smaller re-pack (issue 13), through the CLI ----


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two small, different sources (20 and 12 samples)."""
    a, b = str(tmp_path_factory.mktemp("src_a")), str(tmp_path_factory.mktemp("src_b"))
    synth.generate(a, 20, bgs=2, fgs=2, seed=1, workers=1)
    synth.generate(b, 12, bgs=2, fgs=2, seed=2, workers=1)
    return a, b


def _pack_cli(capsys, src, dst, *extra) -> tuple[int, str]:
    from ray_mmd import cli

    rc = cli.main(["data", "pack", str(src), str(dst), "--workers", "1", *extra])
    return rc, capsys.readouterr().err


def _refused(capsys, tree_digest, tmp_path, src, dst, needle):
    before = tree_digest(str(tmp_path))
    rc, err = _pack_cli(capsys, src, dst)
    assert rc == 2 and err.count("\n") == 1 and needle in err and "--overwrite" in err, err
    assert tree_digest(str(tmp_path)) == before  # nothing written, nothing removed


def test_pack_refuses_another_dataset_unless_overwrite(two_sources, tmp_path, capsys, tree_digest):
    a, b = two_sources
    dst = tmp_path / "p"
    assert _pack_cli(capsys, a, dst, "--shard-size", "8")[0] == 0
    _refused(capsys, tree_digest, tmp_path, b, dst, f"holds a different dataset (packed from '{a}')")
    assert mf.load(str(dst)).source == a
    assert _pack_cli(capsys, a, dst, "--shard-size", "8")[0] == 0  # the same source: a re-pack is fine
    assert _pack_cli(capsys, b, dst, "--shard-size", "8", "--overwrite")[0] == 0
    assert mf.load(str(dst)).source == b and mf.load(str(dst)).num_samples == 12


def test_pack_refuses_another_tools_manifest_and_foreign_files(two_sources, tmp_path, capsys, tree_digest):
    a, _ = two_sources
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "webapp", "version": "1.0"}')
    _refused(capsys, tree_digest, tmp_path, a, other, "is not a ray-mmd manifest (another tool's file?)")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    _refused(
        capsys,
        tree_digest,
        tmp_path,
        a,
        notes,
        "is not empty and holds no ray-mmd dataset (e.g. 'thesis.tex')",
    )
    assert _pack_cli(capsys, a, other, "--overwrite")[0] == 0 and mf.load(str(other)).num_samples == 20
    # make_synthetic (the demo config's first use) refuses the same way
    with pytest.raises(UserError, match="holds no ray-mmd dataset"):
        pack.make_synthetic(str(notes), 10, 5, bgs=2, fgs=2, workers=1)
    assert os.listdir(notes) == ["thesis.tex"]


def test_pack_refuses_a_partial_pack_of_another_source(two_sources, tmp_path, capsys, tree_digest):
    a, b = two_sources
    dst = tmp_path / "p"
    assert _pack_cli(capsys, a, dst, "--shard-size", "8")[0] == 0
    (dst / "manifest.json").unlink()  # as a killed packer leaves it: sidecars, no manifest
    _refused(capsys, tree_digest, tmp_path, b, dst, f"holds part of a different dataset (packed from '{a}')")
    assert _pack_cli(capsys, a, dst, "--shard-size", "8")[0] == 0  # its own source completes it


def test_smaller_repack_removes_shards_it_no_longer_lists(two_sources, tmp_path, capsys):
    a, _ = two_sources
    dst = tmp_path / "p"
    assert _pack_cli(capsys, a, dst, "--shard-size", "4")[0] == 0  # 5 shards
    assert len(list((dst / "shards").glob("*.parquet"))) == 5
    assert _pack_cli(capsys, a, dst, "--shard-size", "8")[0] == 0  # 3 shards
    man = mf.load(str(dst))
    on_disk = sorted(p.name for p in (dst / "shards").iterdir())
    assert on_disk == sorted(n for s in man.shards for n in (s.path[7:], s.path[7:-8] + ".json"))
    assert len(man.shards) == 3 and man.num_samples == 20
