"""storage.py against local disk, memory:// and a real GCS emulator."""

import sys

import pytest

from ray_mmd import storage
from ray_mmd.errors import UserError


def test_local_and_file_urls_resolve_to_the_same_path(tmp_path):
    _, a = storage.filesystem(str(tmp_path / "x"))
    _, b = storage.filesystem(f"file://{tmp_path}/x")
    assert a == b == str(tmp_path / "x")


def test_atomic_write_and_read_back_local(tmp_path):
    url = str(tmp_path / "deep" / "m.json")
    storage.write_bytes_atomic(url, b"{}")
    assert storage.read_bytes(url) == b"{}"
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["m.json"]  # no temp file left


def test_memory_url_round_trip():
    storage.write_bytes_atomic("memory://t/m.json", b"abc")
    assert storage.read_bytes("memory://t/m.json") == b"abc"


def test_unknown_scheme_is_a_user_error():
    with pytest.raises(UserError, match="unsupported storage URL"):
        storage.filesystem("s4://bucket/x")


def test_gdrive_without_extra_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydrive2", None)  # as if the optional extra were not installed
    monkeypatch.setitem(sys.modules, "pydrive2.fs", None)
    with pytest.raises(UserError, match=r"ray-mmd\[gdrive\]"):
        storage.filesystem("gdrive://root/x")


def test_missing_local_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        storage.require(str(tmp_path / "nope"), "dataset")


def test_gcs_round_trip_on_emulator(gcs_emulator):
    bucket = gcs_emulator.new_bucket()
    url = storage.join(bucket, "dir", "m.json")
    storage.write_bytes_atomic(url, b"hello")
    assert storage.read_bytes(url) == b"hello"
    assert storage.exists(url)


def test_missing_bucket_is_a_user_error(gcs_emulator):
    with pytest.raises(UserError, match="bucket gs://no-such-bucket-xyz does not exist"):
        storage.require("gs://no-such-bucket-xyz/data", "dataset")


def test_pyarrow_filesystem_reads_what_gcsfs_wrote(gcs_emulator):
    bucket = gcs_emulator.new_bucket()
    storage.write_bytes_atomic(storage.join(bucket, "f.bin"), b"123")
    fs, path = storage.pyarrow_filesystem(storage.join(bucket, "f.bin"))
    with fs.open_input_stream(path) as f:
        assert f.read() == b"123"
