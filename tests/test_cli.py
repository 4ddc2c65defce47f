"""cli.py: `ray-mmd data synth|pack|inspect`, `train`/`pipeline` arguments -> config, one-line user errors (exit 2)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_mmd import cli
from ray_mmd.data import manifest as mf

ROOT = Path(__file__).resolve().parents[1]


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


# ---- the front door (issue 13): every bad `train` input ends in one line, exit 2, before Ray starts ----

# (override or flag, what the line must say): each a value config.load used to accept, or that a
# worker met only after Ray had started
BAD_TRAIN = [
    (["optim.lr=inf"], "config optim.lr: inf is not a finite number"),
    (["optim.lr=nan"], "config optim.lr: nan is not a finite number"),
    (["optim.lr=0"], "config optim.lr: 0.0 must be > 0"),
    (["optim.weight_decay=-1"], "config optim.weight_decay: -1.0 is below the minimum of 0.0"),
    (["optim.grad_clip=-1"], "config optim.grad_clip: -1.0 must be > 0"),
    (["optim.grad_clip=0"], "or null to turn clipping off"),
    (["optim.warmup_fraction=5"], "config optim.warmup_fraction: 5.0 is not in [0.0, 1.0]"),
    (["optim.momentum=nan"], "config optim.momentum: nan is not a finite number"),
    (["optim.momentum=1"], "config optim.momentum: 1.0 is not in [0.0, 1.0)"),
    (["loss.mask_weight=nan"], "config loss.mask_weight: nan is not a finite number"),
    (["loss.depth_weight=-1"], "config loss.depth_weight: -1.0 is below the minimum of 0.0"),
    (["loss.mask_weight=0", "loss.depth_weight=0"], "both 0, so nothing would be trained"),
    (["loss.depth="], "config loss.depth: empty loss spec"),
    (["loss.mask=nosuchloss"], "config loss.mask: unknown loss 'nosuchloss'"),
    (["loss.mask=l1+"], "config loss.mask:"),
    (["model.name=nosuch"], "config model.name: 'nosuch' is not one of"),
    (["eval.batch_size=0"], "config eval.batch_size: 0 is below the minimum of 1"),
    (["eval.max_samples=0"], "config eval.max_samples: 0 is below the minimum of 1"),
    (["eval.grid_rows=0"], "config eval.grid_rows: 0 is below the minimum of 1"),
    (["run.cpus_per_worker=0"], "config run.cpus_per_worker: 0.0 must be > 0"),
    (["run.max_failures=-5"], "config run.max_failures: -5 is below the minimum of -1 (-1 = unlimited)"),
    (["run.max_preemption_failures=-2"], "config run.max_preemption_failures: -2 is below the minimum of -1"),
    (["run.elastic_resize_interval_s=-1"], "config run.elastic_resize_interval_s: -1.0 must be > 0 seconds"),
    (["run.log_every=0"], "config run.log_every: 0 is below the minimum of 1"),
    (["run.nan_abort_after=0"], "config run.nan_abort_after: 0 is below the minimum of 1"),
    (["data.cache_bytes=-1"], "config data.cache_bytes: -1 is below the minimum of 0"),
    (["data.decoded_preload_bytes=-1"], "config data.decoded_preload_bytes: -1 is below the minimum of 0"),
    (["data.max_bad_fraction=5"], "config data.max_bad_fraction: 5.0 is not in [0.0, 1.0]"),
    (["data.flip_p=nan"], "config data.flip_p: nan is not a finite number"),
    (["data.global_batch_size=0"], "config data.global_batch_size: 0 is below the minimum of 1"),
    (["data.image_size=16"], "config data.image_size: 16 is below the minimum of 32"),
    (["data.chunks=[[-5,10]]"], "config data.chunks: [-5, 10] is not [lo, hi, epochs]"),
    (["data.chunks=[]"], "config data.chunks: empty list"),
    (["data.synthetic.samples=0"], "config data.synthetic.samples: 0 is below the minimum of 1"),
    (["data.url="], "config data.url: empty"),
    (["checkpoint.num_to_keep=1"], "config checkpoint.num_to_keep: 1 is below the minimum of 2"),
    (["checkpoint.every_steps=0"], "config checkpoint.every_steps: 0 is below the minimum of 1"),
    (["debug.step_sleep_s=-1"], "config debug.step_sleep_s: -1.0 is below the minimum of 0.0"),
    (["run.workers=0,2"], "config run.workers: [0, 2] is not MIN,MAX"),
    (["--run-name", ".."], "run name '..' is a relative path, not a name"),
    (["--run-name", "."], "run name '.' is a relative path, not a name"),
    (["--run-name", ""], "run name '' is empty"),
    (["--run-name", "../../etc"], "run name '../../etc' contains a path separator"),
    (["--run-name", "a\x00b"], "run name 'a\\x00b' contains a control character"),
    (["run.name=.."], "run name '..' is a relative path"),
    (["--stage", "2", "model.name=unet224", "--parent", ".."], "parent run name '..' is a relative path"),
    (["--stage", "2", "--parent", "s1"], "stage 2 trains model unet224, not 'unet'"),
]


def _front_door(tmp_path, capsys, argv: list[str], *, env_root=None) -> str:
    """Run `ray-mmd train ARGV` from an empty working dir with the storage root tmp/root/runs; return
    its one stderr line after checking exit 2, that Ray never started and that nothing was written
    anywhere in tmp (neither the root, nor its parent, nor the working dir)."""
    import os

    import ray

    (tmp_path / "cwd").mkdir()
    os.chdir(tmp_path / "cwd")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = cli.main(["train", "--storage", str(tmp_path / "root" / "runs"), *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("ray-mmd: error: ") and "Traceback" not in err, err
    assert not ray.is_initialized()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    return err.strip()


@pytest.mark.parametrize("argv,msg", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_input_is_one_line_before_ray(tmp_path, capsys, monkeypatch, argv, msg):
    monkeypatch.chdir(tmp_path)  # restored after _front_door's chdir
    assert msg in _front_door(tmp_path, capsys, argv)


def test_demo_config_with_a_mistyped_data_url_generates_nothing(tmp_path, capsys, monkeypatch):
    """demo.yaml says `synthetic:` for its own data/demo; a --data URL must hold a packed dataset."""
    monkeypatch.chdir(tmp_path)
    demo = str(ROOT / "jobs" / "configs" / "demo.yaml")
    line = _front_door(tmp_path, capsys, ["--config", demo, "--data", str(tmp_path / "typo")])
    assert line == f"ray-mmd: error: dataset not found at '{tmp_path / 'typo'}': check the path"
    (tmp_path / "empty").mkdir()  # an existing empty folder is not a place for a synthetic set either
    shutil.rmtree(tmp_path / "cwd")
    line = _front_door(tmp_path, capsys, ["--config", demo, "--data", str(tmp_path / "empty")])
    assert "no manifest.json at" in line and not list((tmp_path / "empty").iterdir())


def test_data_with_a_foreign_manifest_is_one_line_on_the_driver(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text('{"name": "other-tool", "files": []}')
    line = _front_door(tmp_path, capsys, ["--data", str(tmp_path / "ds")])
    assert "is not a valid ray-mmd manifest (no format_version; another tool's file?)" in line


def test_unreachable_gs_storage_is_one_line_before_ray(tmp_path, capsys, monkeypatch, packed_dataset):
    from tests.conftest import free_port

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nobody listens
    (tmp_path / "cwd").mkdir()
    os.chdir(tmp_path / "cwd")
    rc = cli.main(["train", "--storage", "gs://b/runs", "--data", packed_dataset])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "cannot reach 'gs://b/runs'" in err and "refused the connection" in err
    assert not list((tmp_path / "cwd").iterdir())


def test_parent_that_is_a_path_but_not_a_checkpoint(tmp_path, capsys, monkeypatch, packed_dataset):
    monkeypatch.chdir(tmp_path)
    argv = [
        "--stage",
        "2",
        "model.name=unet224",
        "--data",
        packed_dataset,
        "--parent",
        str(tmp_path / "x" / "y"),
    ]
    assert "is a path but not a checkpoint folder" in _front_door(tmp_path, capsys, argv)
    shutil.rmtree(tmp_path / "cwd")
    argv = ["--stage", "2", "model.name=unet224", "--data", packed_dataset, "--parent", "nothing-here"]
    assert "no checkpoints of parent run 'nothing-here'" in _front_door(tmp_path, capsys, argv)


def test_bad_loss_name_subprocess_exits_2_in_one_line(tmp_path):
    """The issue's headline case, as a user types it (it took 90 s and 261 lines)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_mmd.cli",
            "train",
            "loss.mask=nosuchloss",
            "--storage",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("ray-mmd: error: config loss.mask: unknown loss 'nosuchloss'")
    assert not list(tmp_path.iterdir())


def test_pipeline_checks_all_three_configs_before_stage_1(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "s3.yaml"
    bad.write_text("stage: 3\nmodel: {name: unet224}\noptim: {lr: .inf}\n")
    configs = ",".join(str(ROOT / "jobs" / "configs" / f"stage{n}.yaml") for n in (1, 2)) + f",{bad}"
    assert cli.main(["pipeline", "--configs", configs, "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "config optim.lr: inf is not a finite number" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s3.yaml"]
