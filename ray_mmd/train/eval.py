"""Evaluation on the test split (all ranks, disjoint samples) and the run directory's logs.

Rank 0 writes into the run directory (local or gs://): `metrics.jsonl` (one JSON object per log line),
`grids/eval_NNNN.png` + `grid_latest.png` (prediction grids), and TensorBoard events under `tensorboard/`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from ray_mmd import storage

log = logging.getLogger("ray_mmd.train")


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


@torch.no_grad()
def evaluate(run: Any, index: int) -> dict[str, float]:
    """Metrics of the current model on the test split (synced across ranks); rank 0 writes a PNG grid."""
    from ray_mmd.data.stream import eval_batches
    from ray_mmd.data.transforms import make_finisher
    from ray_mmd.metrics import MetricAccumulator
    from ray_mmd.models import split_heads
    from ray_mmd.viz import prediction_grid

    cfg = run.cfg
    model = run.ddp.module if hasattr(run.ddp, "module") else run.ddp
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(run.device)
    grid_batch = None
    t0 = time.perf_counter()
    from ray_mmd.train.loop import stream_config

    scfg = stream_config(cfg, [])
    finish = make_finisher(run.man, scfg.image_size).to(run.device)
    for wire in eval_batches(
        scfg, run.rank, run.world, cfg.eval.batch_size, max_samples=cfg.eval.max_samples
    ):
        batch = run.policy.prepare_batch(wire, finish)
        x, mask, depth = batch["x"], batch["mask"], batch["depth"]
        with run.policy.autocast():
            y = model(x)
        mask_logits, depth_pred = split_heads(y.float())
        acc.update(mask_logits, mask, depth_pred, depth)
        if grid_batch is None and run.rank == 0:
            grid_batch = (x, mask, mask_logits, depth, depth_pred)
    metrics = acc.compute(sync=run.world > 1)
    model.train(was_training)
    if run.rank == 0:
        if grid_batch is not None:
            png = prediction_grid(*grid_batch, rows=cfg.eval.grid_rows)
            storage.write_bytes_atomic(storage.join(run.run_url, "grids", f"eval_{index:04d}.png"), png)
            storage.write_bytes_atomic(storage.join(run.run_url, "grid_latest.png"), png)
        log.info(
            "eval %d at step %d (%.1fs): %s",
            index,
            run.progress.global_step,
            time.perf_counter() - t0,
            " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
        )
    return metrics
