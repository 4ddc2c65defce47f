"""What every part of a sweep agrees on: the score (from held-out metrics, comparable across losses), when
evaluations happen, and each trial's event files (one small object per event, so gs:// works too)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from typing import Any

from ray_mmd import storage
from ray_mmd.config import TrainConfig

log = logging.getLogger("ray_mmd.tune")

SCORE = "score"
# what a trial reports at each evaluation (besides the score): the held-out metrics of metrics.py
EVAL_METRICS = ("iou", "dice", "abs_rel", "rmse", "delta1", "delta2", "delta3")
FAILED_SCORE = 1e6  # non-finite metrics (a diverged trial): the worst score ASHA can still compare


def score_of(m: dict[str, Any]) -> float:
    """(1 - mask IoU) + depth AbsRel on the held-out split; FAILED_SCORE when either is not finite."""
    iou, absrel = m.get("eval/iou"), m.get("eval/abs_rel")
    if iou is None or absrel is None:
        return math.nan
    s = (1.0 - float(iou)) + float(absrel)
    return s if math.isfinite(s) else FAILED_SCORE


def eval_steps(cfg: TrainConfig, man: Any) -> list[int]:
    """Global steps at which a trial of `cfg` evaluates (each epoch's end, over the chunk schedule)."""
    from ray_mmd.train.inputs import chunk_schedule

    out, step, g = [], 0, cfg.data.global_batch_size
    for c in chunk_schedule(cfg, man):
        per = len(man.sample_ids("train", c.lo, c.hi)) // g
        for _ in range(c.epochs):
            step += per
            out.append(step)
    return out


def event(trial_url: str, kind: str, data: Any = None) -> None:
    name = f"{kind}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}.json"
    storage.write_bytes_atomic(storage.join(trial_url, "events", name), json.dumps(data).encode())


def events(trial_url: str) -> dict[str, int]:
    """{kind: count} of a trial's events."""
    fs, path = storage.filesystem(storage.join(trial_url, "events"))
    try:
        names = [os.path.basename(n.rstrip("/")) for n in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return {}
    out: dict[str, int] = {}
    for n in names:
        if n.endswith(".json"):
            k = n.split("-", 1)[0]
            out[k] = out.get(k, 0) + 1
    return out
