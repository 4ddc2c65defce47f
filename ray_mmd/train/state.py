"""Everything a resume needs, saved and loaded as one unit; checkpoint files, verification and fallback.

`TrainState` is a named collection of objects with `state_dict()` / `load_state_dict()` (model,
optimizer, scheduler, scaler, RNGs, the data stream's position, progress, lineage, ...): adding a
stateful thing is one keyword argument. A checkpoint directory holds `state.pt` (torch.save of the
collection) and `meta.json` (sha256 and size of state.pt, step, stage). A checkpoint counts only if
meta.json is present, the digest matches and `torch.load(weights_only=True)` succeeds, so a torn upload
is never trusted: restore walks back to the newest one that verifies.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ray_mmd import storage

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CKPT_RE = re.compile(r"^checkpoint_(\d{9})_")
FORMAT = 1


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class RNGState:
    """Python, NumPy and torch (CPU + CUDA) generator states, in weights_only-loadable form."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        d: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached": float(cached),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            d["cuda"] = torch.cuda.get_rng_state_all()
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
    """Counters of the run: global step, stage, skipped (non-finite) steps, evaluations, restarts."""

    stage: int = 1
    global_step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    evals: int = 0
    restarts: int = 0
    best: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class Lineage:
    """Where this run's weights came from: run name, stage, and the parent checkpoint (if any)."""

    run: str = ""
    stage: int = 1
    parent: dict[str, Any] | None = None  # {"run", "checkpoint", "stage", "step", "parent": ...}

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run, "stage": self.stage, "parent": self.parent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run, self.stage, self.parent = state["run"], state["stage"], state["parent"]


@dataclass
class IdLedger:
    """Debug record of the sample ids trained at each global step (all ranks), kept in the checkpoint.

    Because it is saved and restored with the weights, it lists exactly the steps that count in the
    final state: the exactly-once tests read it from the last checkpoint.
    """

    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, step: int, world_size: int, ids: list[int]) -> None:
        self.steps[str(step)] = {"world": world_size, "ids": ids}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = dict(state["steps"])


class Value:
    """A plain JSON-able value (e.g. the config) held in the state collection."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


class TrainState:
    """A named set of Stateful parts, saved and restored together."""

    def __init__(self, **parts: Stateful) -> None:
        self.parts = parts

    def __getitem__(self, name: str) -> Stateful:
        return self.parts[name]

    def state_dict(self) -> dict[str, Any]:
        return {name: p.state_dict() for name, p in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any], skip: Iterable[str] = ()) -> None:
        missing = [n for n in self.parts if n not in state and n not in skip]
        if missing:
            raise KeyError(f"checkpoint lacks state for {missing}")
        for name, part in self.parts.items():
            if name not in skip and name in state:
                part.load_state_dict(state[name])


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
    import shutil

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


def restore_latest(
    run_url: str, preferred: str | None = None, what: str = "restored from"
) -> tuple[dict[str, Any], dict[str, Any], str] | None:
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


def final_checkpoint(run_url: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The newest verified checkpoint of a finished (or stopped) run; raise CheckpointError if none."""
    found = restore_latest(run_url, what="newest valid checkpoint:")
    if found is None:
        raise CheckpointError(f"no valid checkpoint under {run_url}")
    return found
