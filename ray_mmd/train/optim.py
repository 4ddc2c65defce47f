"""The optimizer and the LR schedule, both built from the config; the schedule is a pure function of the
global step, so it does not depend on the world size or on how often the run was restarted."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ray_mmd.config import TrainConfig
from ray_mmd.train.step import make_optimizer


def lr_lambda(cfg: TrainConfig, steps: int) -> Callable[[int], float]:
    """LR multiplier as a pure function of the global step."""
    o = cfg.optim
    warm = max(1, int(o.warmup_fraction * steps))

    def f(step: int) -> float:
        if o.schedule == "constant":
            return min(1.0, (step + 1) / warm)
        if o.schedule == "onecycle":
            if step < warm:
                return 0.05 + 0.95 * step / warm
            t = min(1.0, (step - warm) / max(1, steps - warm))
            return 0.5 * (1 + math.cos(math.pi * t)) * 0.99 + 0.01
        t = min(1.0, step / steps)  # cosine
        return 0.5 * (1 + math.cos(math.pi * t)) * 0.99 + 0.01

    return f


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Fused where possible: a non-finite step is then skipped on device, without a host sync."""
    o = cfg.optim
    kw = {"momentum": o.momentum} if o.name == "sgd" else {}
    return make_optimizer(params, o.name, lr=o.lr, weight_decay=o.weight_decay, **kw)


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_lambda`; its state_dict (the step) is saved with the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
