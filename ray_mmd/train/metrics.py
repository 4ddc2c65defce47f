"""What a run reports: the window of step outputs read at the log interval (the only host sync, and the
non-finite guard), the input pipeline's counters, the rank-0 progress bar, and the run directory's logs
(`metrics.jsonl` + TensorBoard events, local or remote)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from typing import Any

import torch

from ray_mmd import storage

log = logging.getLogger("ray_mmd.train")

# stream counters that add up over ranks (data/* in metrics.jsonl and TensorBoard)
_SUMMED_DATA_COUNTERS = (
    "samples",
    "quarantined",
    "decoded",
    "preload_hits",
    "shards_opened",
    "cache_hits",
    "cache_misses",
    "cache_evictions",
    "cache_refetches",
)


class NonFiniteLossError(RuntimeError):
    """K steps in a row had a NaN/inf loss."""


class MetricsWindow:
    """Step outputs (on-device tensors) since the last read, and the guard against a non-finite streak.

    `add` never syncs; `flush` reads the whole window at once, counts skipped steps into `progress`,
    and raises NonFiniteLossError once `abort_after` steps in a row were non-finite. The streak is not
    checkpointed: a restart resumes from a checkpoint written before it.
    """

    def __init__(self, abort_after: int, log_every: int, rank: int) -> None:
        self.abort_after, self.rank = abort_after, rank
        self.outs: list[dict[str, torch.Tensor]] = []
        self.ids: deque[tuple[int, torch.Tensor]] = deque(maxlen=max(abort_after, log_every))
        self.streak = 0  # non-finite steps in a row, as of the last flush
        self.t0, self.images = time.perf_counter(), 0

    def add(self, step: int, out: dict[str, torch.Tensor], ids: torch.Tensor, images: int) -> None:
        self.outs.append(out)
        self.ids.append((step, ids))
        self.images += images

    def flush(self, progress: Any, lr: float, last_good: str | None) -> dict[str, float]:
        """Means of the window's finite steps, img/s, skipped steps and LR; {} when the window is empty."""
        if not self.outs:
            return {}
        stacked = {k: torch.stack([w[k] for w in self.outs]).float().cpu() for k in self.outs[0]}
        finite = stacked.pop("finite").bool().tolist()
        steps = [s for s, _ in list(self.ids)[-len(finite) :]]
        for ok, s in zip(finite, steps, strict=False):
            if ok:
                self.streak = 0
                continue
            progress.skipped_steps += 1
            self.streak += 1
            if self.streak >= self.abort_after:
                bad = dict(self.ids).get(s)
                raise NonFiniteLossError(
                    f"{self.streak} non-finite losses in a row ending at global step {s}; offending batch "
                    f"sample ids (rank {self.rank}): {bad.tolist() if bad is not None else '?'}; last good "
                    f"checkpoint (before the streak): {last_good or 'none'}"
                )
        good = ~torch.isnan(stacked["loss"]) & ~torch.isinf(stacked["loss"])
        out = {k: float(v[good].mean()) if good.any() else float("nan") for k, v in stacked.items()}
        self.outs.clear()
        dt = time.perf_counter() - self.t0
        out["img_per_s"] = self.images / dt if dt > 0 else 0.0
        out["skipped_steps"] = progress.skipped_steps
        out["lr"] = lr
        self.t0, self.images = time.perf_counter(), 0
        return out


def data_counters(stats: dict[str, Any], device: torch.device, world: int, rank: int) -> dict[str, float]:
    """The input pipeline's counters of this attempt (samples, quarantined, cache hits/misses...),
    summed over ranks. Called at epoch end by every rank, where a sync costs nothing."""
    keys = [k for k in _SUMMED_DATA_COUNTERS if k in stats]
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(t)
    out = {f"data/{k}": v for k, v in zip(keys, t.tolist(), strict=True)}
    out["data/dropped"] = float(stats["dropped_total"])  # the epoch remainders: the same on every rank
    out.update(remote_decode_counters(stats, world))
    if rank == 0:
        log.info("data: %s", " ".join(f"{k[5:][:24]}={v:.0f}" for k, v in out.items()))
    return out


def remote_decode_counters(stats: dict[str, Any], world: int) -> dict[str, float]:
    """The Ray decoder's counters summed over ranks: data/remote_units, data/remote_retries and
    data/remote_nodes/<node id> (units decoded on that Ray node), so a run's metrics show where its
    input was decoded; {} when no rank decoded with Ray. Every rank gathers (a collective), even one
    without the Ray decoder: "auto" resolves per rank, and a decode node may join between two ranks."""
    mine = {k: stats[k] for k in ("remote_units", "remote_retries", "remote_nodes") if k in stats}
    parts: list[Any] = [mine]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
    out: dict[str, float] = {}
    for p in parts:
        if not p:
            continue
        for k in ("remote_units", "remote_retries"):
            out[f"data/{k}"] = out.get(f"data/{k}", 0.0) + float(p.get(k, 0))
        for node, n in p.get("remote_nodes", {}).items():
            key = f"data/remote_nodes/{node}"
            out[key] = out.get(key, 0.0) + float(n)
    return out


def plain(m: dict[str, Any]) -> dict[str, Any]:
    """Metrics as JSON-able ints, strings and floats (what ray.train.report accepts everywhere)."""
    return {k: (v if isinstance(v, int | str) else float(v)) for k, v in m.items()}


class ProgressBar:
    """tqdm on rank 0 (when run.progress), showing the last window's losses and img/s."""

    def __init__(self, enabled: bool, total: int, initial: int, stage: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=f"stage {stage}",
                unit="step",
                mininterval=10.0,  # Ray forwards each refresh as a line of the driver's output
                dynamic_ncols=True,
            )

    def update(self, step: int, m: dict[str, float] | None = None) -> None:
        if self.bar is None:
            return
        if m:
            self.bar.set_postfix(
                loss=f"{m['loss']:.4f}",
                mask=f"{m.get('mask', 0):.3f}",
                depth=f"{m.get('depth', 0):.3f}",
                img_s=f"{m['img_per_s']:.0f}",
                refresh=False,  # update() refreshes, at most every mininterval
            )
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class RunLog:
    """metrics.jsonl + TensorBoard events of a run (rank 0 only); works for local and remote run dirs."""

    def __init__(self, run_url: str, resume_step: int = 0) -> None:
        """resume_step: the global step this attempt starts from; what an earlier attempt logged past it
        is trained again, so it is dropped (metrics.jsonl) or purged (TensorBoard)."""
        from torch.utils.tensorboard import SummaryWriter

        self.run_url = run_url
        self.local = storage.split_url(run_url)[0] == "file"
        if self.local:
            self.tb_dir = storage.split_url(storage.join(run_url, "tensorboard"))[1]
        else:
            self.tb_dir = tempfile.mkdtemp(prefix="ray_mmd_tb_")
        os.makedirs(self.tb_dir, exist_ok=True)
        self.tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1 if resume_step else None)
        self.lines: list[str] = []
        self.metrics_url = storage.join(run_url, "metrics.jsonl")
        self._rewind(resume_step)

    def _rewind(self, step: int) -> None:
        """Keep the lines of steps <= step (a line cut short by a kill is dropped too)."""
        if not storage.exists(self.metrics_url):
            return
        lines = storage.read_bytes(self.metrics_url).decode().splitlines()
        keep = [x for x in lines if _step_of(x) <= step]
        if len(keep) != len(lines):
            log.info(
                "metrics.jsonl: dropped %d lines logged past step %d by an earlier attempt",
                len(lines) - len(keep),
                step,
            )
            storage.write_bytes_atomic(self.metrics_url, "".join(x + "\n" for x in keep).encode())

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        line = json.dumps({"time": time.time(), "kind": kind, "step": step, **values})
        if self.local:
            path = storage.split_url(self.metrics_url)[1]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(line + "\n")
        else:
            self.lines.append(line)
        if kind == "eval":
            self.flush()

    def flush(self) -> None:
        self.tb.flush()
        if self.local:
            return
        # object stores have no append: rewrite metrics.jsonl with what is there plus our new lines
        old = storage.read_bytes(self.metrics_url).decode() if storage.exists(self.metrics_url) else ""
        storage.write_bytes_atomic(self.metrics_url, (old + "".join(x + "\n" for x in self.lines)).encode())
        self.lines.clear()
        fs, base = storage.filesystem(storage.join(self.run_url, "tensorboard"))
        for name in os.listdir(self.tb_dir):
            fs.put_file(os.path.join(self.tb_dir, name), f"{base}/{name}")

    def close(self) -> None:
        self.flush()
        self.tb.close()
        if not self.local:
            shutil.rmtree(self.tb_dir, ignore_errors=True)
