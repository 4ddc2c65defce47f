"""cli.py: `ray-mmd data synth|pack|inspect`, `train`/`pipeline` arguments -> config, one-line user errors (exit 2)."""

import subprocess
import sys

import pytest

from ray_mmd import cli
from ray_mmd.data import manifest as mf


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


def test_train_flags_become_one_validated_config():
    args = cli._parser().parse_args(
        [
            "-v",
            "train",
            "--stage",
            "2",
            "--run-name",
            "r",
            "--storage",
            "gs://b/runs",
            "--workers",
            "1,4",
            "--parent",
            "s1",
            "model.name=unet224",
            "optim.lr=0.5",
        ]
    )
    cfg = cli.train_config(
        args, config=args.config, stage=args.stage, run_name=args.run_name, parent=args.parent
    )
    assert (cfg.stage, cfg.run.name, cfg.run.storage, cfg.run.workers) == (2, "r", "gs://b/runs", [1, 4])
    assert (cfg.parent, cfg.model.name, cfg.optim.lr, cfg.run.verbose) == ("s1", "unet224", 0.5, True)
    args = cli._parser().parse_args(["train", "-v", "--data", "d"])  # -v after the command works too
    cfg = cli.train_config(args, config=None, stage=None, run_name=None, parent=None)
    assert cfg.run.verbose and cfg.data.url == "d" and cfg.stage == 1


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["train", "optim.amp=int8"], "optim.amp: 'int8' is not one of auto, off, bf16, fp16"),
        (["train", "--config", "{t}/missing.yaml"], "not found"),
        (["pipeline", "--configs", "{t}/missing.yaml"], "not found"),
        (["train", "--stage", "2", "model.name=unet224"], "set parent="),
    ],
)
def test_train_user_errors_exit_2_before_ray_starts(tmp_path, capsys, argv, msg):
    import ray

    assert cli.main([a.format(t=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not ray.is_initialized()
