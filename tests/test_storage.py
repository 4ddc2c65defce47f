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


def test_read_jsonl_skips_a_torn_last_line_and_non_objects(tmp_path):
    url = str(tmp_path / "metrics.jsonl")
    assert storage.read_jsonl(url) == []
    storage.write_bytes_atomic(url, b'{"step": 1}\n[1, 2]\n{"step": 2}\n{"step": 3, "lo')
    assert storage.read_jsonl(url) == [{"step": 1}, {"step": 2}]


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


# ---- roots that cannot be escaped ----------------------------------------------------------------

import http.server  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["stage1", "mmd-2024_06.b", "a", "x" * 200, "über"])
def test_safe_component_accepts_plain_names(name):
    assert storage.safe_component(name) == name


@pytest.mark.parametrize(
    "name,why",
    [
        ("", "is empty"),
        (".", "is a relative path"),
        ("..", "is a relative path"),
        ("a/b", "path separator"),
        ("../x", "path separator"),
        ("/abs", "path separator"),
        ("a\\b", "path separator"),
        ("a\x00b", "control character"),
        ("a\nb", "control character"),
        ("a\x7f", "control character"),
        (" x", "space"),
        ("x" * 201, "longer than 200"),
    ],
)
def test_safe_component_refuses_in_one_line(name, why):
    with pytest.raises(UserError) as e:
        storage.safe_component(name, "run name")
    msg = str(e.value)
    assert why in msg and msg.startswith("run name ") and "e.g. 'stage1'" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "root,part,want",
    [
        ("/data/ds", "shards/s.parquet", "/data/ds/shards/s.parquet"),
        ("/data/ds", "a/../b", "/data/ds/b"),
        ("file:///data/ds", "x", "file:///data/ds/x"),
        ("gs://b/ds", "shards/s.parquet", "gs://b/ds/shards/s.parquet"),
        ("gs://b", "x", "gs://b/x"),
        ("memory://t/ds", "x", "memory://t/ds/x"),
    ],
)
def test_join_under_keeps_paths_inside(root, part, want):
    assert storage.join_under(root, part) == want


@pytest.mark.parametrize(
    "root,part,why",
    [
        ("/data/ds", "../x", "leaves its root"),
        ("/data/ds", "../../../../etc/passwd", "leaves its root"),
        ("/data/ds", "a/../../ds2/x", "leaves its root"),
        ("/data/ds", "/etc/passwd", "is absolute"),
        ("/data/ds", "~/x", "is absolute"),
        ("/data/ds", "C:/x", "is absolute"),
        ("/data/ds", "a\\..\\..\\x", "backslash"),
        ("/data/ds", "a\x00", "control character"),
        ("/data/ds", "", "is empty"),
        ("file:///data/ds", "../x", "leaves its root"),
        ("gs://b/ds", "../ds2/x", "leaves its root"),
        ("gs://b/ds", "../../other/x", "leaves its root"),
        ("gs://b/ds", "gs://other/x", "is a URL"),
        ("gs://b", "../c/x", "leaves its root"),
        ("memory://t/ds", "../../u", "leaves its root"),
        ("/data/ds", "file:///etc/passwd", "is a URL"),
    ],
)
def test_join_under_refuses_escapes(root, part, why):
    with pytest.raises(UserError, match=why) as e:
        storage.join_under(root, part, what="shard path")
    assert "\n" not in str(e.value) and root in str(e.value)


def test_join_under_writes_nothing_outside(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    storage.write_bytes_atomic(storage.join_under(str(root), "a", "b.bin"), b"1")
    with pytest.raises(UserError):
        storage.write_bytes_atomic(storage.join_under(str(root), "..", "c.bin"), b"1")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.bin", "root"]


def test_atomic_write_onto_a_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        storage.write_bytes_atomic(str(tmp_path / "d"), b"x")
    assert list((tmp_path / "d").iterdir()) == []  # not moved *into* it under a temp name


# ---- gs:// reachability: one line, no retries ------------------------------------------------------


@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget earlier successes and restore STORAGE_EMULATOR_HOST after the test."""
    monkeypatch.setattr(storage, "_reachable", set())
    return monkeypatch


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_reachable_on_emulator(gcs_emulator, fresh_probe):
    bucket = gcs_emulator.new_bucket()
    storage.check_reachable(bucket + "/ds")
    assert storage.exists(bucket + "/ds") is False


def test_missing_bucket_on_emulator_is_one_line(gcs_emulator, fresh_probe):
    with pytest.raises(UserError, match=r"bucket gs://no-such-b1 does not exist: create it \(gcloud") as e:
        storage.check_reachable("gs://no-such-b1/ds")
    assert "\n" not in str(e.value)
    assert storage.exists("gs://no-such-b1/ds") is False  # exists(): a missing bucket holds nothing


def test_dead_emulator_port_is_one_line(fresh_probe):
    host = f"http://127.0.0.1:{closed_port()}"
    fresh_probe.setenv("STORAGE_EMULATOR_HOST", host)
    with pytest.raises(UserError) as e:
        storage.exists("gs://b/ds")
    msg = str(e.value)
    assert f"STORAGE_EMULATOR_HOST={host} refused the connection" in msg and "gs://b/ds" in msg
    assert "start the emulator" in msg and "\n" not in msg


def test_unresolvable_emulator_host_is_one_line(fresh_probe):
    fresh_probe.setenv("STORAGE_EMULATOR_HOST", "emulator.invalid:9023")
    with pytest.raises(UserError, match=r"http://emulator.invalid:9023 does not resolve .*no network"):
        storage.require("gs://b/ds", "dataset")


def test_no_network_to_real_gcs_is_one_line(fresh_probe):
    """No emulator: the real endpoint. `.invalid` never resolves, as storage.googleapis.com does not offline."""
    fresh_probe.delenv("STORAGE_EMULATOR_HOST", raising=False)
    fresh_probe.setattr(storage, "_GCS_ENDPOINT", "https://storage.invalid")
    with pytest.raises(UserError, match=r"does not resolve .*check the network \(or proxy\)"):
        storage.check_reachable("gs://b/ds")


class _Server:
    """A real HTTP server on loopback that answers every GET with one fixed status and body."""

    def __init__(self, status: int, body: bytes) -> None:
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def test_wrong_service_on_emulator_port_is_one_line(fresh_probe):
    """STORAGE_EMULATOR_HOST pointing at some other web server (404 to everything)."""
    srv = _Server(404, b"")
    try:
        fresh_probe.setenv("STORAGE_EMULATOR_HOST", srv.url)
        with pytest.raises(UserError, match="answers, but not as the GCS JSON API does"):
            storage.check_reachable("gs://b/ds")
    finally:
        srv.close()


def test_denied_is_one_line_naming_credentials(fresh_probe):
    """What GCS answers without credentials (401 + JSON error) becomes the gcloud auth hint."""
    srv = _Server(401, b'{"error": {"code": 401, "message": "Anonymous caller"}}')
    try:
        fresh_probe.setenv("STORAGE_EMULATOR_HOST", srv.url)
        with pytest.raises(
            UserError, match=r"denied \(401\) anonymously .*gcloud auth application-default login"
        ):
            storage.check_reachable("gs://b/ds")
    finally:
        srv.close()


def test_silent_endpoint_times_out_in_one_line(fresh_probe):
    """A port that accepts connections and never answers (a hung proxy): bounded by the timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        fresh_probe.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{s.getsockname()[1]}")
        with pytest.raises(UserError, match="did not answer in time|gave no answer within"):
            storage.check_reachable("gs://b/ds", timeout=1.0)


def test_cli_dead_emulator_is_one_line_without_traceback(tmp_path):
    """As a user types it: `ray-mmd data inspect gs://...` with a dead emulator -> one line, exit 2."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{closed_port()}",
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_mmd.cli",
            "data",
            "inspect",
            "gs://b/ds",
            "--png",
            str(tmp_path / "s.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and "refused the connection" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
