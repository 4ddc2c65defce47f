"""optim.py: the LR schedule is a pure function of the global step; the optimizer follows the config."""

from __future__ import annotations

import pytest
import torch

from ray_mmd.config import load
from ray_mmd.train import optim


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_lr_schedule_is_a_function_of_the_global_step(schedule):
    cfg = load(None, [f"optim.schedule={schedule}", "optim.warmup_fraction=0.1"])
    f = optim.lr_lambda(cfg, 100)
    vals = [f(s) for s in range(101)]
    assert max(vals) == pytest.approx(1.0, abs=0.05)
    if schedule == "cosine":  # no warmup: from 1 down to 1% of the LR
        assert vals == sorted(vals, reverse=True) and vals[-1] < 0.05
    else:  # warmup over the first 10 steps
        assert vals[0] < vals[5] < vals[10]
        assert vals[-1] < 0.05 if schedule == "onecycle" else vals[-1] == 1.0
    assert optim.lr_lambda(cfg, 100)(37) == f(37)  # no hidden state: same step, same LR


def test_scheduler_state_resumes_the_same_lr():
    cfg = load(None, ["optim.lr=0.1"])
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = optim.build_optimizer(cfg, params)
    sched = optim.build_scheduler(cfg, opt, 50)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = optim.build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))])
    sched2 = optim.build_scheduler(cfg, opt2, 50)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.1 * optim.lr_lambda(cfg, 50)(7)]


def test_optimizer_follows_the_config():
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd = optim.build_optimizer(load(None, ["optim.name=sgd", "optim.momentum=0.5"]), p)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.5 and sgd.defaults["fused"]
    assert isinstance(optim.build_optimizer(load(None, []), p), torch.optim.AdamW)
