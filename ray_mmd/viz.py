"""PNG figures: prediction grids (one row per sample: fg_bg | bg | mask GT | mask pred | depth GT | depth pred)
and sweep curves (score vs step per trial)."""

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


_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def sweep_curves(
    curves: dict[str, list[list[float]]], stopped: set[str] | None = None, title: str = "score vs step"
) -> bytes:
    """PNG bytes of one line per trial (score against global step; lower is better). Trials in `stopped`
    are dashed and end with an x, so early-stopped trials read as the shorter lines they are."""
    stopped = stopped or set()
    w, h, left, right, top, bottom = 760, 420, 60, 20, 24, 36
    legend_h = 14 * len(curves) + 6
    im = Image.new("RGB", (w, h + legend_h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    pts = [(s, v) for c in curves.values() for s, v in c if np.isfinite(v) and v < 1e5]
    xmax = max([s for s, _ in pts], default=1) or 1
    ylo, yhi = (min(v for _, v in pts), max(v for _, v in pts)) if pts else (0.0, 1.0)
    if yhi - ylo < 1e-9:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    pad = 0.05 * (yhi - ylo)
    ylo, yhi = ylo - pad, yhi + pad

    def xy(s: float, v: float) -> tuple[float, float]:
        v = min(max(v, ylo), yhi)
        return (left + (w - left - right) * s / xmax, top + (h - top - bottom) * (yhi - v) / (yhi - ylo))

    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for i in range(5):  # axis ticks
        v = ylo + (yhi - ylo) * i / 4
        y = xy(0, v)[1]
        d.line([left - 4, y, left, y], fill=(0, 0, 0))
        d.text((2, y - 6), f"{v:.3f}", fill=(0, 0, 0))
        s = xmax * i / 4
        x = xy(s, ylo)[0]
        d.line([x, h - bottom, x, h - bottom + 4], fill=(0, 0, 0))
        d.text((x - 8, h - bottom + 6), f"{s:.0f}", fill=(0, 0, 0))
    d.text((left, 4), f"{title} (lower is better)", fill=(0, 0, 0))
    d.text((w - right - 60, h - 14), "global step", fill=(0, 0, 0))
    for k, (name, c) in enumerate(curves.items()):
        col = _PALETTE[k % len(_PALETTE)]
        seq = [xy(s, v if np.isfinite(v) and v < 1e5 else yhi) for s, v in c]
        dashed = name in stopped
        for a, b in zip(seq, seq[1:], strict=False):
            if dashed:  # dashes: every other tenth of the segment
                for j in range(0, 10, 2):
                    p0 = (a[0] + (b[0] - a[0]) * j / 10, a[1] + (b[1] - a[1]) * j / 10)
                    p1 = (a[0] + (b[0] - a[0]) * (j + 1) / 10, a[1] + (b[1] - a[1]) * (j + 1) / 10)
                    d.line([p0, p1], fill=col, width=2)
            else:
                d.line([a, b], fill=col, width=2)
        for x, y in seq:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=col)
        if dashed and seq:
            x, y = seq[-1]
            d.line([x - 5, y - 5, x + 5, y + 5], fill=col, width=2)
            d.line([x - 5, y + 5, x + 5, y - 5], fill=col, width=2)
        ly = h + 4 + 14 * k
        d.line([left, ly + 6, left + 20, ly + 6], fill=col, width=3)
        d.text((left + 26, ly), name + ("  (stopped early)" if dashed else ""), fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ---- inference outputs (infer.py) ---------------------------------------------------------------


def png_bytes(a: np.ndarray) -> bytes:
    """H x W (gray) or H x W x 3 uint8 -> PNG bytes (fast zlib level: ~4x quicker than the default,
    files a little larger; prediction outputs are written by the thousand)."""
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# Turbo colour map (Mikhailov 2019) as its published polynomial fit: no matplotlib needed.
_TURBO = np.array(
    [
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ]
)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """H x W depth in [0, 1] (brighter = nearer) -> H x W x 3 uint8 with the turbo map (red = near)."""
    t = np.clip(depth.astype(np.float64), 0, 1)
    powers = np.stack([t**i for i in range(6)], -1)  # H x W x 6
    rgb = np.clip(powers @ _TURBO.T, 0, 1)
    return (rgb * 255).round().astype(np.uint8)


def best_worst_grid(
    best: list[list[torch.Tensor]],
    worst: list[list[torch.Tensor]],
    best_labels: list[tuple[int, float]],
    worst_labels: list[tuple[int, float]],
) -> bytes:
    """PNG: the best samples by IoU above the worst, each a prediction_grid row with its id and IoU.

    Each sample is [x 6xSxS, mask GT, mask logits, depth GT, depth pred] (as in prediction_grid)."""
    parts = []
    for title, rows, labels in (("best by IoU", best, best_labels), ("worst by IoU", worst, worst_labels)):
        stacked = [torch.stack([r[i] for r in rows]) for i in range(5)]
        grid = Image.open(io.BytesIO(prediction_grid(*stacked, rows=len(rows))))
        label = Image.new("RGB", (grid.width, 14 * (len(labels) + 1)), (255, 255, 255))
        draw = ImageDraw.Draw(label)
        draw.text((2, 1), title, fill=(0, 0, 0))
        for k, (sid, iou) in enumerate(labels):
            draw.text((2, 14 * (k + 1)), f"row {k + 1}: sample {sid}  IoU {iou:.3f}", fill=(0, 0, 0))
        parts += [label, grid.convert("RGB")]
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), (255, 255, 255))
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
