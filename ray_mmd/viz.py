"""Prediction grids as PNG: one row per sample, columns fg_bg | bg | mask GT | mask pred | depth GT | depth pred."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw

COLUMNS = ("fg_bg", "bg", "mask GT", "mask pred", "depth GT", "depth pred")


def _to_uint8_rgb(img: torch.Tensor) -> np.ndarray:
    """C×H×W (C = 1 or 3) -> H×W×3 uint8; images are min-max stretched (inputs arrive normalised)."""
    img = img.detach().float().cpu()
    lo, hi = img.amin(), img.amax()
    img = (img - lo) / (hi - lo).clamp_min(1e-6)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _unit_to_uint8(img: torch.Tensor) -> np.ndarray:
    """1×H×W in [0,1] (targets, predictions) -> H×W×3 uint8 without stretching, so values compare."""
    img = img.detach().float().cpu().clamp(0, 1).expand(3, -1, -1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def prediction_grid(
    x: torch.Tensor,
    mask_gt: torch.Tensor,
    mask_logits: torch.Tensor,
    depth_gt: torch.Tensor,
    depth_pred: torch.Tensor,
    rows: int = 8,
) -> bytes:
    """PNG bytes of a grid for the first `rows` samples; x is n×6×H×W (fg_bg channels 0-2, bg 3-5)."""
    n = min(rows, x.shape[0])
    h, w = x.shape[-2:]
    pad, top = 2, 14
    canvas = np.full((top + n * (h + pad), len(COLUMNS) * (w + pad), 3), 255, np.uint8)
    mask_pred = torch.sigmoid(mask_logits.float())
    for r in range(n):
        cells = [
            _to_uint8_rgb(x[r, :3]),
            _to_uint8_rgb(x[r, 3:6]),
            _unit_to_uint8(mask_gt[r]),
            _unit_to_uint8(mask_pred[r]),
            _unit_to_uint8(depth_gt[r]),
            _unit_to_uint8(depth_pred[r]),
        ]
        for c, cell in enumerate(cells):
            y0, x0 = top + r * (h + pad), c * (w + pad)
            canvas[y0 : y0 + h, x0 : x0 + w] = cell
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for c, name in enumerate(COLUMNS):
        draw.text((c * (w + pad) + 2, 1), name if w >= 48 else name.split()[0][:6], fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
