"""ray_mmd/tune.py on one real `ray start --head` cluster (2 CPUs, token auth, dashboard) shared by the module.

Sweeps run as the user runs them, `python jobs/tune.py --config X` with RAY_ADDRESS, so a driver can be
SIGKILLed and run again. Bad input is checked first, without Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from ray_mmd import cli, tune
from ray_mmd.data import manifest as mf
from ray_mmd.train import checkpoint as st

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GBS = 16


def _base(packed: str, **extra: object) -> dict:
    b = {
        "stage": 1,
        "data": {"url": packed, "image_size": 32, "epochs": 2, "global_batch_size": GBS},
        "model": {"name": "unet", "width": 4},
        "optim": {"amp": "off", "lr": 0.01},
        "checkpoint": {"every_steps": 2, "num_to_keep": 2},
        "eval": {"max_samples": 16, "batch_size": 16},
        "run": {"log_every": 2, "progress": False},
    }
    for k, v in extra.items():
        tune._set(b, k, v)
    return b


def _write(path: Path, base: dict, space: dict, **sweep: object) -> Path:
    doc = {
        "base": base,
        "space": space,
        "sweep": {"name": "exp", "storage": str(path.parent / "sweeps"), **sweep},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


# ---- bad input: one line each, before any trial starts (no Ray needed) ----------------------------


def _err(argv: list[str], capsys) -> str:
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "space, sweep, expect",
    [
        ({"loss.mask": {"grid": ["l1+dice", "l1+dcie"]}}, {}, "unknown loss 'dcie'"),
        ({}, {}, "empty search space"),
        ({"optim.lr": {"grid": []}}, {}, "non-empty list"),
        ({"optim.lr": {"loguniform": [0.0, 0.1]}}, {}, "lo > 0"),
        ({"optim.lr": {"grid": [0.01, 0.1]}}, {"metric": "train/loss"}, "not reported by any trial"),
        (
            {"data.global_batch_size": {"grid": [1, 16]}},
            {"resources": {"workers": 2}},
            "cannot be split over 2",
        ),
        ({"optim.lr": {"grid": [0.01, 0.1]}, "model.widht": 4}, {}, "unknown config key"),
        ({"run.workers": {"grid": [1, 2]}}, {}, "set by the sweep"),
    ],
)
def test_bad_sweep_files_fail_in_one_line(packed_dataset, tmp_path, capsys, space, sweep, expect):
    f = _write(tmp_path / "s.yaml", _base(packed_dataset), space, **sweep)
    assert expect in _err(["tune", "run", "--config", str(f)], capsys)


def test_micro_batch_limit_and_oversized_batch(packed_dataset, tmp_path, capsys):
    f = _write(
        tmp_path / "s.yaml",
        _base(packed_dataset, **{"data.micro_batch_size": 1}),
        {"data.global_batch_size": {"choice": [16, 128]}},
    )
    assert "micro-batches" in _err(["tune", "run", "--config", str(f)], capsys)
    f = _write(tmp_path / "s.yaml", _base(packed_dataset), {"data.global_batch_size": {"choice": [16, 4096]}})
    assert "larger than the" in _err(["tune", "run", "--config", str(f)], capsys)


def test_resume_of_missing_or_different_experiment(packed_dataset, tmp_path, capsys):
    f = _write(tmp_path / "s.yaml", _base(packed_dataset), {"optim.lr": {"grid": [0.01, 0.1]}})
    assert "no sweep experiment" in _err(["tune", "run", "--config", str(f), "--resume"], capsys)
    sw = tune.load_sweep(str(f))
    os.makedirs(sw.url)
    (Path(sw.url) / tune.SPACE_FILE).write_text(json.dumps({"fingerprint": "another-space"}))
    assert "different search space" in _err(["tune", "run", "--config", str(f)], capsys)
    assert "no sweep experiment" in _err(["tune", "export", str(tmp_path), "--out", "x.yaml"], capsys)


def test_resource_request_no_node_can_satisfy():
    nodes = [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]
    tune.check_resources(tune.Resources(workers=[2, 2], cpus_per_worker=2, gpus_per_worker=0.5), nodes)
    with pytest.raises(tune.UserError, match="lower sweep.resources"):
        tune.check_resources(tune.Resources(workers=[3, 3], cpus_per_worker=2, gpus_per_worker=0.5), nodes)
    with pytest.raises(tune.UserError, match="GPU: 2"):
        tune.check_resources(tune.Resources(workers=[1, 1], gpus_per_worker=2), nodes)


# ---- real sweeps on one shared cluster -----------------------------------------------------------


@pytest.fixture(scope="module")
def head():
    """`ray start --head --block` in its own process group (2 CPUs, dashboard for Train's PG cleaner)."""
    port, dash = _free_port(), _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="rmt", dir="/tmp"))  # Ray's socket paths must stay short
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={tmp}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_port(dash, 90)
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the dashboard did not listen on {port} within {timeout}s")


def _sweep(env: dict, config: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "jobs/tune.py", "--config", str(config)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _by_index(board: dict) -> list[dict]:
    return sorted(board["trials"], key=lambda r: r["trial"].rsplit("_", 1)[1])


@pytest.mark.slow
def test_sweep_asha_leaderboard_export_trains(head, packed_dataset, tmp_path, capsys):
    """4 trials (2 mask losses x LR 0.01 / 1e-6, the hopeless ones last), ASHA from epoch 2 of 4.

    The hopeless LR is 1e-6, not 10: on a budget this small an LR-10 model collapses to constant outputs,
    whose AbsRel beats a barely trained model's, so it is not clearly worse by the score; a model that
    does not move stays at its initial score, which the LR-0.01 trials beat by epoch 2."""
    f = _write(
        tmp_path / "s.yaml",
        # 0.4 s a step: an epoch takes longer than Tune needs to act on ASHA's stop (a few seconds)
        _base(packed_dataset, **{"data.epochs": 4, "checkpoint.every_steps": 100, "debug.step_sleep_s": 0.4}),
        {"loss.mask": {"grid": ["l1+dice", "bce"]}, "optim.lr": {"grid": [0.01, 1e-6]}},
        max_concurrent_trials=2,
        asha={"grace_period": 2, "reduction_factor": 2},
    )
    r = _sweep(head, f)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    exp = tmp_path / "sweeps" / "exp"
    board = json.loads((exp / "leaderboard.json").read_text())
    rows = _by_index(board)
    assert len(rows) == 4 and "rank" in r.stdout, r.stdout[-3000:]  # the printed table
    budget = rows[0]["budget_steps"]
    assert budget == 4 * (len(mf.load(packed_dataset).sample_ids("train")) // GBS)
    hopeless = [x for x in rows if x["settings"]["optim.lr"] == 1e-6]
    # ASHA stopped the LR-10 trials at their first rung, before their budget, and the board says so
    assert "stopped early" in r.stdout, r.stdout[-3000:]
    for x in hopeless:
        assert x["stopped_early"] and x["status"] == "stopped early" and x["steps"] < budget, x
    assert board["trials"][0]["status"] == "completed" and board["trials"][0]["settings"]["optim.lr"] == 0.01
    assert all(x["trainer_starts"] == 1 and x["restarts"] == 0 for x in rows)
    for x in rows:  # one score per eval, steps increasing; a stopped trial's curve is shorter
        steps = [s for s, _ in x["curve"]]
        assert steps == sorted(steps) and steps[-1] == x["steps"]
    assert max(len(x["curve"]) for x in hopeless) < len(board["trials"][0]["curve"])
    csv_lines = (exp / "leaderboard.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "optim.lr" in csv_lines[0] and "stopped_early" in csv_lines[0]
    assert (exp / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best = tmp_path / "best.yaml"
    assert cli.main(["tune", "export", str(exp), "--out", str(best)]) == 0
    capsys.readouterr()
    d = yaml.safe_load(best.read_text())
    assert d["optim"]["lr"] == 0.01 and d["loss"]["mask"] == board["trials"][0]["settings"]["loss.mask"]
    # the exported YAML trains with jobs/stage1.py as is (one short epoch)
    cmd = [sys.executable, "jobs/stage1.py", "--config", str(best), "--storage", str(tmp_path / "runs"),
           "data.chunks=[[0,64,1]]"]  # fmt: skip
    t = subprocess.run(cmd, cwd=ROOT, env=head, capture_output=True, text=True, timeout=180)
    assert t.returncode == 0, (t.stdout + t.stderr)[-3000:]
    _, meta, _ = st.final_checkpoint(str(tmp_path / "runs" / d["run"]["name"]))
    assert meta["reason"] == "final"


def _trial_dirs(exp: Path) -> list[Path]:
    return sorted((exp / "trials").glob("*"), key=lambda p: p.name.rsplit("_", 1)[1])


def _complete_ckpt(run: Path) -> int:
    done = [u for u in st.list_checkpoints(str(run)) if (Path(u) / st.META_FILE).exists()]
    return int(st.CKPT_RE.match(Path(done[0]).name).group(1)) if done else -1


@pytest.mark.slow
def test_worker_and_driver_killed_sweep_finishes_without_rerunning(head, packed_dataset, tmp_path):
    """3 trials one at a time: trial 0's worker is SIGKILLed at step 3 (Ray Train restores it inside the
    trial); the driver is SIGKILLed while trial 1 runs; the same command finishes the sweep."""
    marker = tmp_path / "killed"
    f = _write(
        tmp_path / "s.yaml",
        _base(
            packed_dataset,
            **{
                "debug.kill_at_step": 3,
                "debug.kill_rank": 0,
                "debug.kill_marker": str(marker),
                "debug.record_ids": True,
                "debug.step_sleep_s": 0.15,
            },
        ),
        {"loss.mask": {"grid": ["l1+dice", "bce", "dice"]}},
        max_concurrent_trials=1,
        asha=None,
    )
    exp = tmp_path / "sweeps" / "exp"
    cmd = [sys.executable, "jobs/tune.py", "--config", str(f)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=head, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:  # trial 1 has a checkpoint and Tune's saved state knows it
            trials = _trial_dirs(exp) if (exp / "trials").exists() else []
            states = list(exp.glob("experiment_state-*.json"))
            if len(trials) >= 2 and _complete_ckpt(exp / "train" / trials[1].name) >= 2 and states:
                if trials[1].name in states[0].read_text():
                    break
            assert first.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("trial 1 never checkpointed")
    finally:
        first.kill()  # SIGKILL: no cleanup, like a lost spot VM
        first.wait()
    assert marker.exists()
    r = _sweep(head, f)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "restoring sweep" in r.stdout
    rows = _by_index(json.loads((exp / "leaderboard.json").read_text()))
    assert [x["status"] for x in rows] == ["completed"] * 3, rows
    # trainer starts per trial: trial 0 finished before the kill and was not re-run
    assert [x["trainer_starts"] for x in rows] == [1, 2, 1]
    assert [x["restarts"] for x in rows] == [1, 1, 0]  # trial 0: its worker; trial 1: the driver
    per_epoch = len(mf.load(packed_dataset).sample_ids("train")) // GBS
    for x, resumed in zip(rows, (True, True, False), strict=True):
        sd, meta, _ = st.final_checkpoint(str(exp / "train" / x["trial"]))
        assert meta["reason"] == "final" and meta["step"] == 2 * per_epoch
        assert sd["progress"]["restarts"] == int(resumed)  # resumed from a checkpoint, not from step 0
        steps = sd["ids"]["steps"]  # the exactly-once ledger inside the trial
        assert sorted(int(s) for s in steps) == list(range(2 * per_epoch))
        for e in range(2):
            ids = [i for s in range(e * per_epoch, (e + 1) * per_epoch) for i in steps[str(s)]["ids"]]
            assert len(ids) == len(set(ids)) == per_epoch * GBS
