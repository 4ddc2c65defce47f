"""jobs/*.py against a real `ray start --head` cluster (token auth): `ray job submit`, and a driver killed mid-run.

The cluster is started here with its own token (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN, not ~/.ray) and
stopped by the PID of its `ray start --block` process, never with `ray stop` (other clusters may run).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_mmd.data import manifest as mf
from ray_mmd.train import checkpoint as ck
from tests.conftest import TINY, free_port, wait_for_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    port, dash = free_port(), free_port()
    tmp = Path(tempfile_short())
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={tmp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group
    )
    try:
        wait_for_port(dash, timeout=90)
        yield {"env": env, "gcs": f"127.0.0.1:{port}", "http": f"http://127.0.0.1:{dash}", "tmp": tmp}
    finally:
        # the process group we created: `ray start --block` and every Ray process of this node
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


def tempfile_short() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="rmj", dir="/tmp")  # Ray's socket paths must stay short


def _tiny(packed: str, storage: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config",
        "jobs/configs/demo.yaml",
        "--storage",
        str(storage),
        "--data",
        packed,
        "--run-name",
        name,
        "--workers",
        "2,2",
        *TINY,
        "data.global_batch_size=16",
        *extra,
    ]


def test_ray_job_submit_succeeds_with_small_working_dir(ray_head, packed_dataset, tmp_path):
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["http"]}
    args = _tiny(packed_dataset, tmp_path, "submitted", "data.chunks=[[0,64,1]]")
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "jobs/stage1.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    job = re.search(r"Job '(raysubmit_\w+)' succeeded", out)
    assert job, out[-3000:]
    status = subprocess.run(  # ask the job server again: `ray job status` says "Job '<id>' succeeded"
        [str(BIN / "ray"), "job", "status", job.group(1)], env=env, capture_output=True, text=True, timeout=60
    )
    assert f"Job '{job.group(1)}' succeeded" in status.stdout + status.stderr
    assert "held-out metrics:" in out and "iou=" in out and "checkpoint:  " in out
    assert ck.list_checkpoints(str(tmp_path / "submitted"))
    pkgs = list((ray_head["tmp"]).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*"))
    assert pkgs, "working dir package not found"
    files = [p for p in pkgs[0].rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    assert size < 5_000_000, size  # .gitignore keeps .venv, data/ and runs/ out
    assert not any(
        part in (".venv", "data", "runs") for p in files for part in p.relative_to(pkgs[0]).parts[:1]
    )


def newest_complete(run: Path) -> int:
    """Step of the newest checkpoint that verifies right now (-1 if none)."""
    for url in ck.list_checkpoints(str(run)):
        try:
            return ck.load_checkpoint(url)[1]["step"]
        except ck.CheckpointError:
            continue
    return -1


def test_driver_killed_rerun_resumes_from_latest_checkpoint(ray_head, packed_dataset, tmp_path):
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"]}
    cmd = [
        sys.executable,
        "jobs/stage1.py",
        *_tiny(
            packed_dataset,
            tmp_path,
            "driver",
            "data.chunks=[[0,120,2]]",
            "debug.step_sleep_s=0.4",
            "debug.record_ids=true",
        ),
    ]
    run = tmp_path / "driver"
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, seen = time.monotonic() + 150, -1
        while time.monotonic() < deadline and seen < 4:
            seen = max([newest_complete(run), seen])
            time.sleep(0.1)
        assert seen >= 4, "no checkpoint at step >= 4 in time"
    finally:
        first.kill()  # SIGKILL: no cleanup, like a lost Colab session
        first.wait()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at global step (\d+)", out)]
    assert resumed and resumed[0] >= seen, (resumed, seen)  # lost at most one checkpoint interval
    sd, meta, _ = ck.final_checkpoint(str(run))
    assert meta["reason"] == "final"
    steps = sd["ids"]["steps"]
    per_epoch = len(mf.load(packed_dataset).sample_ids("train", 0, 120)) // 16
    ids = [i for s in range(per_epoch) for i in steps[str(s)]["ids"]]
    assert len(ids) == len(set(ids)) == per_epoch * 16
