"""stages.py: which model each stage trains, parent lookup by run name, spine initialisation + freezing."""

from __future__ import annotations

import pytest
import torch

from ray_mmd.config import load
from ray_mmd.errors import UserError
from ray_mmd.models import build_model
from ray_mmd.train import checkpoint as ck
from ray_mmd.train import stages


def _cfg(tmp_path, *ov: str):
    return load(None, [f"run.storage={tmp_path}", "model.width=4", *ov])


def _parent_run(tmp_path, name="s1", steps=(5, 9)):
    """A stage-1 run dir with two checkpoints of a width-4 spine; returns the newest's weights."""
    for step in steps:
        torch.manual_seed(step)
        m = build_model("unet", width=4)
        sd = {"model": m.state_dict(), "lineage": {"run": name, "stage": 1, "parent": None}}
        ck.write_checkpoint(
            str(tmp_path / name / ck.checkpoint_dir_name(step, "x")), sd, {"step": step, "stage": 1}
        )
    return m.state_dict()


def test_stage_model_and_parent_rules(tmp_path):
    with pytest.raises(UserError, match="stage 2 trains model unet224"):
        stages.stage_of(_cfg(tmp_path, "stage=2", "model.name=unet", "parent=s1"))
    with pytest.raises(UserError, match="set parent="):
        stages.stage_of(_cfg(tmp_path, "stage=2", "model.name=unet224"))
    with pytest.raises(UserError, match="run stage 1 first"):
        stages.parent_checkpoint(_cfg(tmp_path, "stage=2", "model.name=unet224", "parent=nothing-here"))
    assert stages.stage_of(_cfg(tmp_path)).init == "scratch"


def test_stage2_loads_newest_parent_into_spine_and_freezes_it(tmp_path):
    want = _parent_run(tmp_path)
    cfg = _cfg(tmp_path, "stage=2", "model.name=unet224", "parent=s1")
    model = build_model("unet224", width=4)
    rec = stages.init_from_parent(model, cfg)
    assert (
        rec["run"] == "s1" and rec["step"] == 9 and rec["checkpoint"].endswith(ck.checkpoint_dir_name(9, "x"))
    )
    assert all(torch.equal(v, model.spine.state_dict()[k]) for k, v in want.items())
    stages.apply_freeze(model, cfg)
    assert not any(p.requires_grad for p in model.spine.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    stages.apply_freeze(model, _cfg(tmp_path, "stage=3", "model.name=unet224", "parent=s1"))
    assert all(p.requires_grad for p in model.parameters())


def test_parent_by_checkpoint_url_and_width_mismatch(tmp_path):
    _parent_run(tmp_path)
    url = str(tmp_path / "s1" / ck.checkpoint_dir_name(5, "x"))
    cfg = _cfg(tmp_path, "stage=2", "model.name=unet224", f"parent={url}")
    assert stages.init_from_parent(build_model("unet224", width=4), cfg)["step"] == 5
    wide = _cfg(tmp_path, "stage=2", "model.name=unet224", "parent=s1", "model.width=8")
    with pytest.raises(UserError, match="does not fit"):
        stages.init_from_parent(build_model("unet224", width=8), wide)
