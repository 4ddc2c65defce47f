"""cli.py: `ray-mmd data synth|pack|inspect`, `train` forwarding, and one-line user errors with exit 2."""

import subprocess
import sys
import types

import pytest

from ray_mmd import cli
from ray_mmd.data import manifest as mf
from ray_mmd.errors import UserError


def test_synth_pack_inspect(tmp_path, capsys):
    src, dst, png = tmp_path / "src", tmp_path / "p", tmp_path / "s.png"
    assert (
        cli.main(
            [
                "data",
                "synth",
                "--out",
                str(src),
                "--samples",
                "30",
                "--bgs",
                "2",
                "--fgs",
                "2",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert cli.main(["data", "pack", str(src), str(dst), "--shard-size", "10", "--workers", "1"]) == 0
    assert mf.load(str(dst)).num_samples == 30
    assert cli.main(["data", "inspect", str(dst), "--png", str(png), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "packed 30 samples into 3 shards" in out and "30 packed, 0 quarantined" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_user_error_is_one_line_exit_2_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ray_mmd.cli", "data", "pack", str(tmp_path / "missing"), str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("ray-mmd: error: dataset not found")
        and "Traceback" not in r.stderr
    )


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["data", "synth", "--out", "{t}/x", "--samples", "0"], "must be >= 1"),
        (["data", "inspect", "{t}"], "no manifest.json"),
        (["data", "pack", "{t}", "{t}/p", "--test-fraction", "2"], "test-fraction"),
        (["data", "inspect", "s4://b/x"], "unsupported storage URL"),
    ],
)
def test_user_errors_in_process(tmp_path, capsys, argv, msg):
    assert cli.main([a.format(t=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_train_forwards_remaining_argv(monkeypatch):
    seen = []
    fake = types.ModuleType("ray_mmd.train.trainer")

    def main(argv):
        seen.append(argv)
        if "--bad" in argv:
            raise UserError("bad training config: fix it")
        return 7

    fake.main = main
    monkeypatch.setitem(sys.modules, "ray_mmd.train.trainer", fake)
    assert cli.main(["train", "--config", "c.yaml", "--workers", "1,4"]) == 7
    assert seen[-1] == ["--config", "c.yaml", "--workers", "1,4"]
    assert cli.main(["train", "--bad"]) == 2
