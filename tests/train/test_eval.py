"""eval.py: metrics of a model over real test-split batches, and the grid PNG in the run directory."""

from __future__ import annotations

import torch

from ray_mmd.config import load
from ray_mmd.data import manifest as mf
from ray_mmd.models import build_model
from ray_mmd.train import inputs
from ray_mmd.train.eval import evaluate, write_grid
from ray_mmd.train.step import AmpPolicy


def test_evaluate_over_the_test_split_and_write_grid(packed_dataset, tmp_path, one_thread):
    cfg = load(
        None, [f"data.url={packed_dataset}", "data.image_size=32", "eval.batch_size=8", "eval.max_samples=16"]
    )
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    model.train()
    policy = AmpPolicy.for_device("cpu", "off")
    finish = inputs.eval_finisher(cfg, mf.load(packed_dataset))
    m, grid = evaluate(model, inputs.eval_wire_batches(cfg, 0, 1), policy, finish, sync=False, keep_grid=True)
    n_test = len(mf.load(packed_dataset).sample_ids("test"))
    assert m["images"] == min(16, n_test) and 0 <= m["iou"] <= 1 and m["rmse"] > 0
    assert model.training  # the mode is given back
    half = inputs.eval_wire_batches(cfg, 1, 2)  # rank 1 of 2: the other half
    m1, none = evaluate(model, half, policy, finish, sync=False)
    assert none is None and m1["images"] == min(16, n_test) - min(16, n_test) // 2
    write_grid(str(tmp_path), 3, grid, rows=2)
    assert (tmp_path / "grids" / "eval_0003.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "grid_latest.png").exists()
