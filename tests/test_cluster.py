"""cluster/: the local cluster accepts jobs the moment `start` returns and runs them without racing;
the GCP and KubeRay YAMLs bind nothing to 0.0.0.0, turn token auth on, keep the token out of the file,
and the GCP YAML passes Ray's own validation (what `ray up` runs).

One cluster for the module (started by cluster/local_cluster.sh, stopped by it even on failure).
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "cluster" / "local_cluster.sh"
GCP = ROOT / "cluster" / "gcp_spot.yaml"
KUBERAY = ROOT / "cluster" / "kuberay_rayjob.yaml"

# A job that imports the package on the head (its driver) and on both worker nodes (a task pinned to
# each): the import is what failed when three nodes shared one session dir.
PROBE = (
    "import ray, ray_mmd.train.loop, ray_mmd.data.manifest as m; from ray_mmd.data import manifest; "
    "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as A; ray.init(); "
    "f = ray.remote(num_cpus=1)(lambda: __import__('ray_mmd.train.loop').__file__); "
    "ws = [n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')]; "
    "assert len(ws) == 2, ws; "
    "paths = ray.get([f.options(scheduling_strategy=A(w, soft=False)).remote() for w in ws]); "
    "assert all('_ray_pkg_' in p for p in paths + [m.__file__]), (paths, m.__file__); "
    "print('IMPORTED-ON', len(paths) + 1, 'NODES')"
)


def base_port() -> int:
    """A port P with P..P+70 and the dashboard port P+1874 free (the script derives its ports from P)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 1874 > 65000:
            continue
        ok = True
        for q in [*range(p, p + 71), p + 1874]:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
                    break
        if ok:
            return p
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster_state")
    env = {
        **os.environ,
        "RAY": str(BIN / "ray"),
        "RAY_MMD_CLUSTER_STATE": str(state),
        "PYTHONPATH": "",  # jobs must import the package from the uploaded working dir
    }
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(k, None)
    port = base_port()
    try:
        r = subprocess.run(
            ["bash", str(SCRIPT), "start", str(port)], env=env, capture_output=True, text=True, timeout=240
        )
        assert r.returncode == 0, r.stdout + r.stderr
        yield {"state": state, "env": env, "port": port, "out": r.stdout}
    finally:
        # the script stops exactly the PIDs it recorded (and their process groups)
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def client_env(cluster) -> dict[str, str]:
    line = subprocess.run(
        ["bash", str(SCRIPT), "env"], env=cluster["env"], capture_output=True, text=True, check=True
    ).stdout
    env = dict(cluster["env"])
    for kv in line.removeprefix("export ").split():
        k, v = kv.split("=", 1)
        env[k] = v
    return env


@pytest.mark.slow
def test_jobs_submitted_at_once_succeed_in_a_row(local_cluster):
    """Right after `start` returns: three jobs in a row, each importing the package on all three nodes."""
    env = client_env(local_cluster)
    assert env["RAY_ADDRESS"] == f"http://127.0.0.1:{local_cluster['port'] + 1874}"
    assert "RAY_AUTH_TOKEN" not in env  # the token is read from its file, never passed around
    for i in range(3):
        r = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "-c", PROBE],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0 and re.search(r"Job 'raysubmit_\w+' succeeded", out), (
            f"job {i}: {out[-3000:]}"
        )
        assert "IMPORTED-ON 3 NODES" in out, out[-3000:]


@pytest.mark.slow
def test_token_file_is_private_and_required(local_cluster):
    token = local_cluster["state"] / "token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.read_text().strip() not in local_cluster["out"]  # never printed
    env = {k: v for k, v in client_env(local_cluster).items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    r = subprocess.run(
        [str(BIN / "ray"), "job", "list"], env=env, capture_output=True, text=True, timeout=60, cwd="/tmp"
    )
    assert r.returncode != 0 and re.search(r"(?i)auth", r.stdout + r.stderr), r.stdout + r.stderr


@pytest.mark.slow
def test_dashboard_listens_on_loopback_only(local_cluster):
    dash = local_cluster["port"] + 1874
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    binds = {ln.split()[3] for ln in listening.splitlines() if ln.split()[3].endswith(f":{dash}")}
    assert binds == {f"127.0.0.1:{dash}"}, binds


# ---- the cloud YAMLs -------------------------------------------------------------------------------


def _strings(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)
    elif isinstance(x, str):
        yield x


def test_gcp_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(GCP.read_text())
    validate_config(prepare_config(cfg))  # what `ray up` runs; raises on a schema error


def test_gcp_yaml_is_loopback_token_auth_and_drains_spot_workers():
    cfg = yaml.safe_load(GCP.read_text())
    text = "\n".join(_strings(cfg))
    assert "0.0.0.0" not in GCP.read_text()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        joined = " ".join(cmds)
        assert "RAY_AUTH_MODE=token" in joined
        assert "gcloud secrets versions access" in joined  # the token comes from Secret Manager
        assert "umask 077" in joined  # and its file on the node is private
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start" in worker and "--block" in worker  # SIGTERM -> drain with reason PREEMPTION
    assert cfg["available_node_types"]["gpu_spot"]["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text)  # no token value in the file


def test_kuberay_yaml_is_loopback_and_token_from_a_secret():
    raw = KUBERAY.read_text()
    job = yaml.safe_load(raw)
    assert "0.0.0.0" not in raw
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert job["spec"]["submissionMode"] == "SidecarMode"  # the submitter reaches 127.0.0.1 in the head pod
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # never a value in the file
            assert "value" not in env["RAY_AUTH_TOKEN"]
