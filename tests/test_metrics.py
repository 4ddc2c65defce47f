"""Metrics against hand-computed values, empty masks, zero depth, accumulation, no per-batch sync."""

from __future__ import annotations

import math

import pytest
import torch

from ray_mmd.metrics import MetricAccumulator

pytestmark = pytest.mark.usefixtures("one_thread")


def _img(rows):
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), len(rows[0]))


def test_mask_iou_and_dice_by_hand():
    # prediction covers 3 px, ground truth 2 px, overlap 1 px: IoU 1/4, Dice 2/5
    logits = _img([[5.0, 5.0], [5.0, -5.0]])
    gt = _img([[0.9, 0.0], [0.0, 0.8]])  # JPEG-ish values, thresholded at 0.5
    acc = MetricAccumulator()
    acc.update(logits, gt, torch.full_like(gt, 0.5), torch.full_like(gt, 0.5))
    m = acc.compute()
    assert m["iou"] == pytest.approx(0.25)
    assert m["dice"] == pytest.approx(0.4)
    assert m["images"] == 1


def test_empty_masks():
    logits, gt = -torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    logits[1, 0, 0, 0] = 1.0  # image 2: one false positive on an empty ground truth -> 0
    acc = MetricAccumulator()
    d = torch.full_like(gt, 0.5)
    acc.update(logits, gt, d, d)
    m = acc.compute()
    assert m["iou"] == pytest.approx(0.5) and m["dice"] == pytest.approx(0.5)  # (1 + 0) / 2


def test_depth_metrics_by_hand_with_zero_depth_ignored():
    gt = _img([[0.5, 0.25, 0.0, 1.0]])  # the 0.0 pixel is not valid
    pred = _img([[0.5, 0.5, 0.7, 0.9]])
    acc = MetricAccumulator()
    acc.update(torch.zeros_like(gt), gt, pred, gt)
    m = acc.compute()
    abs_rel = (0 + 0.25 / 0.25 + 0.1 / 1.0) / 3
    rmse = math.sqrt((0 + 0.25**2 + 0.1**2) / 3)
    ratios = [1.0, 2.0, 1 / 0.9]
    assert m["depth_valid_px"] == 3
    assert m["abs_rel"] == pytest.approx(abs_rel)
    assert m["rmse"] == pytest.approx(rmse)
    assert m["delta1"] == pytest.approx(sum(r < 1.25 for r in ratios) / 3)
    assert m["delta2"] == pytest.approx(sum(r < 1.25**2 for r in ratios) / 3)
    assert m["delta3"] == pytest.approx(sum(r < 1.25**3 for r in ratios) / 3)


def test_all_zero_depth_and_zero_prediction_are_finite_or_nan_not_errors():
    z = torch.zeros(1, 1, 3, 3)
    acc = MetricAccumulator()
    acc.update(z, z, z, z)
    m = acc.compute()
    assert math.isnan(m["abs_rel"]) and m["depth_valid_px"] == 0
    acc.reset()
    acc.update(z, z, z, torch.full_like(z, 0.5))  # prediction 0 -> clamped, no inf
    assert all(math.isfinite(v) for v in acc.compute().values())


def test_accumulation_equals_one_big_batch_and_reset():
    g = torch.Generator().manual_seed(0)
    logits, mgt = torch.randn(6, 1, 8, 8, generator=g), torch.rand(6, 1, 8, 8, generator=g)
    dp, dg = torch.rand(6, 1, 8, 8, generator=g), torch.rand(6, 1, 8, 8, generator=g)
    one, two = MetricAccumulator(), MetricAccumulator()
    one.update(logits, mgt, dp, dg)
    two.update(logits[:2], mgt[:2], dp[:2], dg[:2])
    two.update(logits[2:], mgt[2:], dp[2:], dg[2:])
    a, b = one.compute(), two.compute()
    assert a == pytest.approx(b)
    restored = MetricAccumulator()
    restored.load_state_dict(two.state_dict())
    assert restored.compute() == pytest.approx(a)
    two.reset()
    assert two.compute()["images"] == 0


def test_update_does_not_sync(monkeypatch):
    calls = []
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "cpu"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    acc = MetricAccumulator()
    x = torch.rand(2, 1, 8, 8)
    for _ in range(3):
        acc.update(x - 0.5, x, x, x)
    assert calls == []
    monkeypatch.undo()
    assert acc.compute()["images"] == 6


def test_compute_sync_without_process_group_is_local():
    acc = MetricAccumulator()
    x = torch.rand(1, 1, 4, 4)
    acc.update(x, x, x, x)
    assert acc.compute(sync=True) == pytest.approx(acc.compute())


def test_compute_sync_all_reduces_in_a_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        acc = MetricAccumulator()
        x = torch.rand(2, 1, 4, 4)
        acc.update(x, x, x, x)
        before = acc.sums.clone()
        assert acc.compute(sync=True) == pytest.approx(acc.compute())
        assert torch.equal(acc.sums, before)  # reduced a copy: local sums stay local
    finally:
        dist.destroy_process_group()
