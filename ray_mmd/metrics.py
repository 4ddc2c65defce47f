"""Mask IoU / Dice and depth AbsRel / RMSE / delta metrics, accumulated on device without host syncs.

``MetricAccumulator.update`` only adds into one on-device float64 tensor of running sums;
``compute()`` is the one place that converts to Python numbers (one transfer), after an optional
``all_reduce`` of the sums across ranks (Ray Train's process group) when ``sync=True``.

Definitions
-----------
Mask (prediction = sigmoid(logits) >= 0.5, ground truth = mask_gt >= 0.5, so JPEG-noisy masks count
as binary), per image, then averaged over images:

* IoU  = |P & G| / |P | G|, and 1.0 when both are empty (nothing to find, nothing found);
* Dice = 2 |P & G| / (|P| + |G|), and 1.0 when both are empty.

Depth (``depth_pred`` already in [0, 1], e.g. the sigmoid of channel 1), pooled over the *valid*
pixels of the whole set: a pixel is valid when depth_gt > ``eps`` (1e-3, below one JPEG grey level),
so zero depth never divides. Predictions are clamped to >= ``eps`` for the ratios.

* AbsRel = mean |p - g| / g
* RMSE   = sqrt(mean (p - g)^2)
* delta_k = fraction with max(p / g, g / p) < 1.25^k, k = 1, 2, 3

With no valid pixel seen, the depth metrics are NaN (and ``depth_valid_px`` is 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Order of the running sums in MetricAccumulator.sums.
_FIELDS = ("images", "iou", "dice", "valid_px", "abs_rel", "sq_err", "d1", "d2", "d3")


class MetricAccumulator:
    """Running sums of the metrics above on ``device``; ``update`` never syncs with the host."""

    def __init__(self, device: torch.device | str = "cpu", eps: float = 1e-3) -> None:
        self.device = torch.device(device)
        self.eps = eps
        # float64 keeps pixel counts exact far beyond an epoch (MPS lacks float64: use float32 there).
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.sums = torch.zeros(len(_FIELDS), device=self.device, dtype=self.dtype)

    def reset(self) -> None:
        self.sums.zero_()

    @torch.no_grad()
    def update(self, mask_logits: Tensor, mask_gt: Tensor, depth_pred: Tensor, depth_gt: Tensor) -> None:
        """Add one batch (all N x 1 x H x W; logits for the mask, [0,1] values for depth)."""
        pred = (mask_logits.detach().float() >= 0).flatten(1)  # sigmoid(z) >= 0.5  <=>  z >= 0
        gt = (mask_gt.detach().float() >= 0.5).flatten(1)
        inter = (pred & gt).sum(1, dtype=self.dtype)
        p_sum = pred.sum(1, dtype=self.dtype)
        g_sum = gt.sum(1, dtype=self.dtype)
        union = p_sum + g_sum - inter
        one = torch.ones_like(inter)
        iou = torch.where(union > 0, inter / union.clamp_min(1), one)
        dice = torch.where(p_sum + g_sum > 0, 2 * inter / (p_sum + g_sum).clamp_min(1), one)

        g = depth_gt.detach().to(self.dtype)
        p = depth_pred.detach().to(self.dtype).clamp_min(self.eps)
        valid = g > self.eps
        gs = torch.where(valid, g, torch.ones_like(g))
        err = p - g
        ratio = torch.maximum(p / gs, gs / p)
        vf = valid.to(self.dtype)
        batch = torch.stack(
            [
                one.sum(),  # image count, without a host-to-device copy
                iou.sum(),
                dice.sum(),
                vf.sum(),
                (vf * err.abs() / gs).sum(),
                (vf * err.square()).sum(),
                (vf * (ratio < 1.25)).sum(),
                (vf * (ratio < 1.25**2)).sum(),
                (vf * (ratio < 1.25**3)).sum(),
            ]
        )
        self.sums += batch.to(self.device, non_blocking=True)

    def compute(self, sync: bool = False) -> dict[str, float]:
        """Metrics as Python floats (the only host sync). ``sync``: all_reduce the sums across ranks."""
        sums = self.sums
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.clone()
            torch.distributed.all_reduce(sums)
        s = dict(zip(_FIELDS, sums.tolist(), strict=True))
        images, valid = s["images"], s["valid_px"]
        nan = math.nan
        return {
            "iou": s["iou"] / images if images else nan,
            "dice": s["dice"] / images if images else nan,
            "abs_rel": s["abs_rel"] / valid if valid else nan,
            "rmse": math.sqrt(s["sq_err"] / valid) if valid else nan,
            "delta1": s["d1"] / valid if valid else nan,
            "delta2": s["d2"] / valid if valid else nan,
            "delta3": s["d3"] / valid if valid else nan,
            "images": images,
            "depth_valid_px": valid,
        }

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.detach().cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sums = state["sums"].to(self.device, self.dtype)
