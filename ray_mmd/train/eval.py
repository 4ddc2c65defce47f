"""Evaluation: metrics of a model over wire batches (synced across ranks) and the prediction grid PNG."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ray_mmd import storage
from ray_mmd.train.step import AmpPolicy

Grid = tuple[torch.Tensor, ...]  # (x, mask, mask_logits, depth, depth_pred) of the first batch


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    policy: AmpPolicy,
    finish: Callable[[dict], dict],
    *,
    sync: bool,
    keep_grid: bool = False,
) -> tuple[dict[str, float], Grid | None]:
    """Metrics of `model` (DDP unwrapped by the caller) over `batches`; `sync`: all-reduce over ranks.

    Returns the metrics and, with `keep_grid`, the first batch's inputs and predictions for a grid.
    """
    from ray_mmd.metrics import MetricAccumulator
    from ray_mmd.models import split_heads

    was_training = model.training
    model.eval()
    acc = MetricAccumulator(policy.device)
    grid = None
    for wire in batches:
        batch = policy.prepare_batch(wire, finish)
        x, mask, depth = batch["x"], batch["mask"], batch["depth"]
        with policy.autocast():
            y = model(x)
        mask_logits, depth_pred = split_heads(y.float())
        acc.update(mask_logits, mask, depth_pred, depth)
        if grid is None and keep_grid:
            grid = (x, mask, mask_logits, depth, depth_pred)
    metrics = acc.compute(sync=sync)
    model.train(was_training)
    return metrics, grid


def write_grid(run_url: str, index: int, grid: Grid, rows: int) -> None:
    """grids/eval_NNNN.png and grid_latest.png in the run directory."""
    from ray_mmd.viz import prediction_grid

    png = prediction_grid(*grid, rows=rows)
    storage.write_bytes_atomic(storage.join(run_url, "grids", f"eval_{index:04d}.png"), png)
    storage.write_bytes_atomic(storage.join(run_url, "grid_latest.png"), png)
