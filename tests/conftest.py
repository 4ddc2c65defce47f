"""Shared fixtures for the real parts: a GCS emulator, a local Ray cluster, small synthetic data.

Every process started here is stopped by PID in a finalizer, even when the test fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tiny run every trainer test starts from: width-4 model, 32 px, frequent checkpoints and logs.
TINY = (
    "model.width=4",
    "data.image_size=32",
    "optim.amp=off",
    "run.progress=false",
    "run.log_every=2",
    "checkpoint.every_steps=2",
    "eval.max_samples=16",
)


def tiny_overrides(packed: str, storage, name: str, *extra: str) -> list[str]:
    """Config overrides of a tiny run `name` on `packed` with checkpoints under `storage`."""
    return [f"data.url={packed}", f"run.storage={storage}", f"run.name={name}", *TINY, *extra]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class GcsEmulator:
    """A real gcp-storage-emulator process on loopback; gcsfs reaches it via STORAGE_EMULATOR_HOST."""

    def __init__(self) -> None:
        self.port = free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("gcp-storage-emulator")
        self.proc = subprocess.Popen(
            [str(exe), "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory", "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.host, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def new_bucket(self) -> str:
        """Create a fresh bucket and return its gs:// URL."""
        from ray_mmd import storage

        name = f"b-{uuid.uuid4().hex[:10]}"
        fs, _ = storage.filesystem(f"gs://{name}")
        fs.mkdir(name)
        fs.invalidate_cache()
        return f"gs://{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def gcs_emulator():
    emu = GcsEmulator()
    old = {k: os.environ.get(k) for k in emu.env()}
    os.environ.update(emu.env())
    try:
        yield emu
    finally:
        emu.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def one_thread():
    """Tiny torch ops on a shared 2-core machine: one thread avoids OpenMP barrier stalls under load."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_packed(tmp_path_factory, samples: int, bgs: int, seed: int, test_fraction: float = 0.1) -> str:
    """A small packed synthetic dataset in a fresh temp dir; returns its root."""
    from ray_mmd.data.pack import make_synthetic

    root = str(tmp_path_factory.mktemp("packed") / "ds")
    make_synthetic(root, samples, bgs, seed=seed, test_fraction=test_fraction)
    return root


def copy_to_gcs(local_root: str, emulator: GcsEmulator) -> str:
    """Upload a local dataset to a fresh bucket on the emulator; returns its gs:// URL."""
    from ray_mmd import storage

    url = emulator.new_bucket() + "/ds"
    fs, path = storage.filesystem(url)
    fs.put(local_root, path, recursive=True)
    fs.invalidate_cache()
    return url


@pytest.fixture(scope="session")
def tree_digest():
    """tree_digest(root) -> {relative path: sha256}: proves a source tree was not modified."""
    import hashlib

    def digest(root: str) -> dict[str, str]:
        out = {}
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
        return out

    return digest


@pytest.fixture(scope="session")
def packed_factory(tmp_path_factory):
    """make_packed(samples, bgs, seed): modules build their own small packed dataset with it."""
    return lambda samples, bgs, seed: make_packed(tmp_path_factory, samples, bgs, seed)


@pytest.fixture(scope="session")
def to_gcs(gcs_emulator):
    """to_gcs(local_root) -> gs:// URL of a copy on the emulator."""
    return lambda root: copy_to_gcs(root, gcs_emulator)


@pytest.fixture(scope="module")
def ray_local(gcs_emulator):
    """A real local Ray cluster (2 CPUs) for one test module; workers see the GCS emulator."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": gcs_emulator.env()},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


# ---- synthetic dataset fixtures (data engineer) ----
# Small, quick (a couple of seconds) and shared by the whole session; tests must not modify them.
SYNTH_SAMPLES, SYNTH_BGS, SYNTH_FGS, SYNTH_SHARD = 200, 4, 3, 32


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> str:
    """A source dataset in the original layout (index.csv + zips): 200 samples, 4 bgs, 3 fgs, seed 0."""
    from ray_mmd.data import synth

    out = str(tmp_path_factory.mktemp("synth_source"))
    synth.generate(out, SYNTH_SAMPLES, bgs=SYNTH_BGS, fgs=SYNTH_FGS, seed=0, workers=1)
    return out


@pytest.fixture(scope="session")
def packed_dataset(synth_source, tmp_path_factory) -> str:
    """`synth_source` packed with shard_size 32; returns the root (ray_mmd.data.manifest.load(root) works)."""
    from ray_mmd.data import pack

    out = str(tmp_path_factory.mktemp("packed_dataset"))
    pack.pack(synth_source, out, shard_size=SYNTH_SHARD, workers=1)
    return out
