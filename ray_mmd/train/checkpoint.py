"""Checkpoints: the files (write, verify, list, fall back past torn ones) and the `Checkpointer` that saves
and restores a run's `TrainState` through Ray Train.

A checkpoint directory holds `state.pt` (torch.save of the state collection) and `meta.json` (sha256 and
size of state.pt, step, stage). A checkpoint counts only if meta.json is present, the digest matches and
`torch.load(weights_only=True)` succeeds, so a torn upload is never trusted: restore walks back to the
newest one that verifies. Upload is asynchronous (Ray Train's ASYNC upload mode); Ray prunes to
`num_to_keep`, and an in-process run (no controller) copies and prunes itself.

What the training thread pays for a checkpoint is a copy of the state's tensors (milliseconds) and Ray's
report; serialising, hashing and uploading happen on Ray's upload thread (`checkpoint_upload_fn`), at
the lowest CPU priority: on a box whose cores the step keeps busy that work takes the idle time rather
than the step's (P6 in benchmarks/bench_train.py). The local staging directory goes once uploaded.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import torch

from ray_mmd import storage
from ray_mmd.train.state import TrainState

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CKPT_RE = re.compile(r"^checkpoint_(\d{9})_")
FORMAT = 1
Found = tuple[dict[str, Any], dict[str, Any], str]  # (state, meta, url) of a verified checkpoint


# ---- checkpoint files ---------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """File wrapper that hashes bytes as torch.save writes them (no second read of a large file)."""

    def __init__(self, f: Any) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)


def checkpoint_dir_name(step: int, token: str) -> str:
    """Sortable by step; the token keeps a re-reached step from reusing a directory Ray may delete."""
    return f"checkpoint_{step:09d}_{token}"


def write_checkpoint(directory: str, state: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Write state.pt then meta.json (with the digest) into a local directory; return the meta."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, STATE_FILE), "wb") as f:
        w = _HashingWriter(f)
        torch.save(state, w)
    meta = {**meta, "format": FORMAT, "sha256": w.h.hexdigest(), "bytes": w.n}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f)
    return meta


class CheckpointError(Exception):
    pass


def load_checkpoint(url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and verify a checkpoint directory (local path or URL); raise CheckpointError if torn."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(url, META_FILE)))
        data = storage.read_bytes(storage.join(url, STATE_FILE))
    except Exception as e:
        raise CheckpointError(f"{url}: unreadable ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{url}: format {meta.get('format')} is not {FORMAT}")
    if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{url}: {STATE_FILE} does not match its digest (torn or truncated)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{url}: torch.load failed ({type(e).__name__}: {e})") from e
    return state, meta


def persist_local(src_dir: str, dst_url: str, run_url: str, num_to_keep: int) -> None:
    """In-process runs (no Ray controller): copy a checkpoint into the run dir and keep the newest K."""

    fs, dst = storage.filesystem(dst_url)
    fs.put(src_dir.rstrip("/") + "/", dst, recursive=True)
    shutil.rmtree(src_dir, ignore_errors=True)
    for old in list_checkpoints(run_url)[num_to_keep:]:
        ofs, opath = storage.filesystem(old)
        ofs.rm(opath, recursive=True)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


def prune_orphans(run_url: str, num_to_keep: int, keep: str | None) -> list[str]:
    """Delete checkpoint directories Ray Train never registered that lie beyond the newest `num_to_keep`;
    never `keep` (the newest one that verifies). Ray's checkpoint manager prunes only what it registered,
    so an attempt whose driver died leaves its later checkpoints behind. Registered ones are Ray's to
    delete (it fails on a checkpoint that is already gone)."""
    snap = storage.join(run_url, RAY_SNAPSHOT)
    registered = storage.read_bytes(snap).decode(errors="replace") if storage.exists(snap) else ""
    doomed = [
        u
        for u in list_checkpoints(run_url)[num_to_keep:]
        if u != keep and os.path.basename(u.rstrip("/")) not in registered
    ]
    for url in doomed:
        try:
            fs, path = storage.filesystem(url)
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
    if doomed:
        log.info(
            "pruned %d checkpoints beyond checkpoint.num_to_keep=%d: %s", len(doomed), num_to_keep, doomed
        )
    return doomed


def list_checkpoints(run_url: str) -> list[str]:
    """Checkpoint directory URLs of a run, newest (highest step, then latest token) first."""
    fs, path = storage.filesystem(run_url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = sorted((os.path.basename(e.rstrip("/")) for e in entries), reverse=True)
    return [storage.join(run_url, n) for n in names if CKPT_RE.match(n)]


def restore_latest(run_url: str, preferred: str | None = None, what: str = "restored from") -> Found | None:
    """Newest checkpoint of the run that verifies, as (state, meta, url); None when there is none.

    Candidates are every checkpoint directory of the run plus `preferred` (the one Ray hands back), newest
    (highest step) first: after a driver crash the newest complete upload may not be registered with Ray
    yet, and it is still a whole, verified state of this run. Each rejected one is logged with the reason.
    """
    listed = list_checkpoints(run_url)
    if preferred and preferred not in listed:
        listed.append(preferred)
    candidates = sorted(listed, key=lambda u: u.rstrip("/").rsplit("/", 1)[-1], reverse=True)
    for i, url in enumerate(candidates):
        try:
            state, meta = load_checkpoint(url)
        except CheckpointError as e:
            log.warning("checkpoint rejected, falling back to the previous one: %s", e)
            continue
        if i:
            log.warning("%s %s (fallback, %d newer rejected)", what, url, i)
        else:
            log.info("%s %s (step %s)", what, url, meta.get("step"))
        return state, meta, url
    if candidates:
        log.warning("none of %d checkpoints of %s verified: starting from scratch", len(candidates), run_url)
    return None


def final_checkpoint(run_url: str) -> Found:
    """The newest verified checkpoint of a finished (or stopped) run; raise CheckpointError if none."""
    found = restore_latest(run_url, what="newest valid checkpoint:")
    if found is None:
        raise CheckpointError(f"no valid checkpoint under {run_url}")
    return found


def snapshot(obj: Any) -> Any:
    """A copy of a state dict that later steps cannot change: tensors copied to host memory (the step
    updates parameters and optimizer moments in place), containers rebuilt, other leaves deep-copied."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.clone() if t.device.type == "cpu" else t.to("cpu")
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v) for v in obj)
    if obj is None or isinstance(obj, int | float | str | bool | bytes):
        return obj
    return copy.deepcopy(obj)


def background_priority() -> None:
    """Lowest CPU priority for the calling thread (Linux: nice applies per thread), so that work on it
    runs in the cores' idle time rather than taking it from the training step's threads."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


def _uploader(state: dict[str, Any], meta: dict[str, Any], tmp: str, caller: int):
    """Ray Train's `checkpoint_upload_fn`: write the snapshot into `tmp`, copy it to the run's storage
    the way Ray does by default, and remove `tmp` (uploaded or not: a failure raises in the loop)."""

    def upload(checkpoint: Any, dir_name: str) -> Any:
        import ray.train

        if threading.get_ident() != caller:  # ASYNC: Ray's upload thread (SYNC runs in the step's)
            background_priority()
        try:
            write_checkpoint(tmp, state, meta)
            return ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return upload


# ---- the component the loop calls --------------------------------------------------------------


class Checkpointer:
    """Saves and restores one run's TrainState: rank 0 writes the files, every rank reports (a barrier).

    `last` is the newest checkpoint of this run, `good` the newest one written before a non-finite
    streak began (what a NaN abort points the user at).
    """

    def __init__(self, run_url: str, *, rank: int, world: int, local: bool, num_to_keep: int) -> None:
        self.run_url, self.rank, self.world = run_url, rank, world
        self.local, self.num_to_keep = local, num_to_keep  # local: in-process run, no Ray controller
        self.token = uuid.uuid4().hex[:6]
        # local staging dirs of this run's checkpoints (removed once uploaded): named after the run
        self.tmp_prefix = f"ray_mmd_ckpt_{os.path.basename(run_url.rstrip('/'))}_"
        self.last: str | None = None
        self.good: str | None = None

    def find(self) -> Found | None:
        """The newest checkpoint of the run that verifies (Ray's registered one is a candidate too)."""
        import ray.train

        ckpt = None if self.local else ray.train.get_checkpoint()
        preferred = storage.join(self.run_url, os.path.basename(ckpt.path.rstrip("/"))) if ckpt else None
        return restore_latest(self.run_url, preferred)

    def load(self, state: TrainState, found: Found) -> None:
        """Resume every part but the config: the one given now wins (e.g. a longer schedule)."""
        sd, _, url = found
        state.load_state_dict(sd, skip=("config",))
        self.last = self.good = url
        if self.rank == 0 and not self.local:  # what an attempt whose driver died left behind
            prune_orphans(self.run_url, self.num_to_keep, keep=url)

    def save(
        self,
        state: TrainState,
        meta: dict[str, Any],
        metrics: dict[str, Any],
        *,
        clean: bool,
        sync: bool = False,
    ) -> None:
        """Write and report a checkpoint; `clean`: no non-finite step since the last good one; `sync`: the
        report returns once it is on storage (a preemption checkpoint), else it uploads in the background."""
        import ray.train

        step, reason = meta["step"], meta["reason"]
        name = checkpoint_dir_name(step, f"{int(time.time() * 1000):x}{self.token}")
        self.last = storage.join(self.run_url, name)
        if clean:
            self.good = self.last
        metrics = {**metrics, "step": step, "reason": reason}
        tmp = tempfile.mkdtemp(prefix=self.tmp_prefix) if self.rank == 0 else ""
        if self.local:  # no controller to persist it: write and copy it into the run dir ourselves
            write_checkpoint(tmp, state.state_dict(), meta)
            persist_local(tmp, self.last, self.run_url, self.num_to_keep)
            ray.train.report(metrics)
            return
        upload = None
        if self.rank == 0:  # the staging dir is empty until the upload function writes it
            upload = _uploader(snapshot(state.state_dict()), meta, tmp, threading.get_ident())
        ray.train.report(
            {**metrics, "world_size": self.world},
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None,
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC
            if sync
            else ray.train.CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=upload,
            # the upload function owns the staging dir and removes it, uploaded or not (Ray's own delete
            # after an ASYNC upload would find it gone and log a traceback per checkpoint)
            delete_local_checkpoint_after_upload=False,
        )
