"""layout.py: reading the CSV + zips in place, locally and from gs:// on a real emulator; hostile zips."""

import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from ray_mmd import storage
from ray_mmd.data import synth
from ray_mmd.data.layout import Layout, Row, SampleError, ZipReader, decode, probe, sniff
from ray_mmd.errors import UserError


def test_rows_by_index_and_range(synth_source):
    lay = Layout(synth_source)
    assert len(lay) == 200
    r = lay[7]
    assert isinstance(r, Row) and r.base_zip.startswith("fg_bg_mask_") and r.bg_zip == "bg.zip"
    assert lay.rows(5, 9) == lay[5:9] and len(lay.rows(5, 9)) == 4 and lay.rows(5, 9)[2] == r
    assert lay[-1] == lay[199]
    # member bytes are the zip's own bytes
    with zipfile.ZipFile(os.path.join(synth_source, r.base_zip)) as zf:
        assert lay.member(r.base_zip, r.image_name) == zf.read(r.image_name)
    s = lay.sample(7)
    assert s["fg_bg"].shape == (250, 250, 3) and s["bg"].shape == (250, 250, 3)
    assert s["mask"].shape == (250, 250) and s["depth"].shape == (240, 320)
    assert s["mask"].dtype == np.uint8


def test_csv_url_and_folder_url_are_the_same_dataset(synth_source):
    a, b = Layout(synth_source), Layout(os.path.join(synth_source, "index.csv"))
    assert len(a) == len(b) and a[3] == b[3] and a.sample_bytes(3) == b.sample_bytes(3)


def test_reads_in_place_without_writing_anything(synth_source, tmp_path, monkeypatch):
    before = sorted(os.listdir(synth_source))
    monkeypatch.chdir(tmp_path)
    lay = Layout(synth_source)
    for i in range(0, 200, 25):
        lay.sample(i)
    lay.close()
    assert sorted(os.listdir(synth_source)) == before and os.listdir(tmp_path) == []


def test_reads_from_gs_on_the_emulator(synth_source, gcs_emulator):
    bucket = gcs_emulator.new_bucket()
    fs, _ = storage.filesystem(bucket)
    fs.put(synth_source, bucket[5:] + "/src", recursive=True)
    lay, local = Layout(bucket + "/src"), Layout(synth_source)
    assert len(lay) == 200 and lay[150] == local[150]
    for i in (0, 99, 150, 199):  # rows from different part zips
        assert lay.sample_bytes(i) == local.sample_bytes(i)


def test_missing_bucket_and_unreadable_urls_are_one_line_user_errors(gcs_emulator, tmp_path):
    with pytest.raises(UserError, match="bucket gs://no-such-bucket-zz9 does not exist"):
        Layout("gs://no-such-bucket-zz9/ds")
    with pytest.raises(UserError, match="not found"):
        Layout(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="unsupported storage URL"):
        Layout("ftp://host/ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="expected one index .csv"):
        Layout(str(tmp_path / "empty"))
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(UserError, match="not a UTF-8 CSV"):
        Layout(str(tmp_path / "bin.csv"))
    for fn in (lambda: Layout("gs://no-such-bucket-zz9/ds"), lambda: Layout(str(tmp_path / "nowhere"))):
        with pytest.raises(UserError) as e:
            fn()
        assert "\n" not in str(e.value)


def test_csv_missing_a_column_names_it(synth_source, tmp_path):
    text = open(os.path.join(synth_source, "index.csv")).read().replace("Depthname", "DepthName", 1)
    (tmp_path / "index.csv").write_text(text)
    with pytest.raises(UserError, match=r"lacks column\(s\) Depthname"):
        Layout(str(tmp_path))


def test_csv_with_extra_and_reordered_columns(synth_source, tmp_path):
    import csv

    rows = list(csv.reader(open(os.path.join(synth_source, "index.csv"))))
    with open(tmp_path / "other.csv", "w", newline="") as f:
        w = csv.writer(f)
        for r in rows:
            w.writerow(["x"] + r[::-1])
    lay = Layout(str(tmp_path / "other.csv"))
    assert lay[4] == Layout(synth_source)[4]


def test_decode_by_content_not_extension():
    rgb = np.random.default_rng(0).integers(0, 255, (250, 250, 3), np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    jpeg = synth.encode_rgb(rgb)
    assert sniff(png.getvalue()) == "png" and sniff(jpeg) == "jpeg"
    assert np.array_equal(decode(png.getvalue()), rgb)  # PNG bytes (say, in a member named .jpg)
    assert decode(jpeg).shape == (250, 250, 3)
    assert probe(synth.encode_gray(rgb[..., 0])) == ("jpeg", 250, 250, 1)
    for bad, kind in (
        (b"", "zero-byte"),
        (b"hello world", "unknown magic"),
        (jpeg[: len(jpeg) // 2], "corrupt"),
    ):
        with pytest.raises(SampleError, match=kind):
            decode(bad)


def _zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)


def test_zip_slip_member_name_is_only_a_key(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    _zip(work / "z.zip", [("../../x", b"\xff\xd8\xffpayload"), ("/abs/y", b"data")])
    monkeypatch.chdir(work)
    zr = ZipReader(str(work))
    assert zr.read("z.zip", "../../x") == b"\xff\xd8\xffpayload"
    assert zr.read("z.zip", "/abs/y") == b"data"
    zr.close()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "z.zip"]


def _patch_sizes(raw: bytes, size: int) -> bytes:
    """Rewrite the uncompressed size in the local header and the central directory entry (one member)."""
    b = bytearray(raw)
    lh = b.find(b"PK\x03\x04")
    b[lh + 22 : lh + 26] = size.to_bytes(4, "little")
    cd = b.find(b"PK\x01\x02")
    b[cd + 24 : cd + 28] = size.to_bytes(4, "little")
    return bytes(b)


def test_zip_bomb_declared_and_actual_sizes_are_bounded(tmp_path):
    zeros = b"\0" * (2 << 20)
    _zip(tmp_path / "bomb.zip", [("m.jpg", zeros)], zipfile.ZIP_DEFLATED)
    assert (tmp_path / "bomb.zip").stat().st_size < 10_000
    zr = ZipReader(str(tmp_path), max_member_bytes=1 << 20)
    with pytest.raises(SampleError, match="declares") as e:
        zr.read("bomb.zip", "m.jpg")
    assert e.value.kind == "oversize"
    # a header that lies small: the bounded read and the CRC check still refuse it
    (tmp_path / "liar.zip").write_bytes(_patch_sizes((tmp_path / "bomb.zip").read_bytes(), 1000))
    with pytest.raises(SampleError):
        ZipReader(str(tmp_path), max_member_bytes=1 << 20).read("liar.zip", "m.jpg")


def test_member_faults_are_sample_errors(tmp_path):
    _zip(tmp_path / "z.zip", [("fg_bg/a.jpg", b"\xff\xd8\xffx"), ("mask/empty.jpg", b"")])
    (tmp_path / "notzip.zip").write_bytes(b"this is not a zip")
    zr = ZipReader(str(tmp_path))
    assert zr.read("z.zip", "a.jpg") == b"\xff\xd8\xffx"  # CSV names without the folder still resolve
    cases = [
        (("z.zip", "mask/empty.jpg"), "zero bytes", "empty"),
        (("z.zip", "nope.jpg"), "missing from z.zip", "missing"),
        (("gone.zip", "a.jpg"), "zip gone.zip not found", "missing"),
        (("notzip.zip", "a.jpg"), "unreadable", "corrupt"),
    ]
    for args, msg, kind in cases:
        with pytest.raises(SampleError, match=msg) as e:
            zr.read(*args)
        assert e.value.kind == kind
