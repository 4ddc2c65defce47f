"""Sample transforms: JPEG decode at reduced DCT scale, batch resize, normalisation, joint flips."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Decoders. PIL's `draft` and simplejpeg's min_height/min_width both use libjpeg-turbo's DCT scaling
# (1/2, 1/4, 1/8), so a 250x250 JPEG decodes straight to 63x63 for a 56 target. PIL releases the GIL
# while decoding (threads scale); simplejpeg holds it but is faster per core (use it in processes).
DECODERS = ("pil", "simplejpeg")


def decode_image(data: bytes, min_size: int, gray: bool, lib: str = "pil") -> np.ndarray:
    """Decode one JPEG to H×W×C uint8 (C=1 if gray), at the smallest DCT scale still ≥ min_size.

    Raises on corrupt data; callers quarantine the sample.
    """
    if not data:
        raise ValueError("empty image bytes")
    if lib == "simplejpeg":
        import simplejpeg

        try:
            return simplejpeg.decode_jpeg(
                data, colorspace="GRAY" if gray else "RGB", min_height=min_size, min_width=min_size
            )
        except Exception:
            pass  # not a JPEG libjpeg-turbo accepts here (e.g. a PNG): let PIL try
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    mode = "L" if gray else "RGB"
    if im.format == "JPEG":
        im.draft(mode, (min_size, min_size))
    im = im.convert(mode)
    a = np.asarray(im)
    return a[:, :, None] if gray else a


def resize_u8(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Stack H×W×C uint8 images into an n×C×size×size uint8 tensor (bilinear, antialiased).

    Images are grouped by shape so each group is one vectorised interpolate.
    """
    if not images:
        return torch.zeros((0, 1, size, size), dtype=torch.uint8)
    c = images[0].shape[2]
    out = torch.empty((len(images), c, size, size), dtype=torch.uint8)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(images):
        groups.setdefault(a.shape, []).append(i)
    for shape, idx in groups.items():
        if shape[0] == size and shape[1] == size:
            out[idx] = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2)
            continue
        # uint8 in, uint8 out: torch's vectorised uint8 antialias kernel wants channels-last RGB and is
        # ~7x faster than converting to float first. Gray images ride three to a pixel as the R, G, B
        # planes of one image (the kernel treats channels independently, so this is exact), ~5x faster.
        if c == 3:
            t = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2)
        else:
            pad = (-len(idx)) % 3
            planes = [images[i][:, :, 0] for i in idx] + [np.zeros(shape[:2], np.uint8)] * pad
            trip = np.stack(planes).reshape(-1, 3, shape[0], shape[1]).transpose(0, 2, 3, 1)
            t = torch.from_numpy(np.ascontiguousarray(trip)).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if c == 1:
            t = t.reshape(-1, 1, size, size)[: len(idx)]
        out[idx] = t
    return out


def decode_samples(
    fg_bg: Sequence[bytes], mask: Sequence[bytes], depth: Sequence[bytes], size: int, lib: str = "pil"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, list[str]]:
    """Decode and resize n samples to uint8 tensors.

    Returns (fg n×3×S×S, mask n×S×S, depth n×S×S, ok bool[n], reasons). Rows that failed to decode
    (ok False) hold zeros and `reasons[i]` says why; they are never returned as training data.
    """
    n = len(fg_bg)
    ok = np.ones(n, dtype=bool)
    reasons = [""] * n
    fgs, ms, ds = [], [], []
    blank3 = np.zeros((size, size, 3), np.uint8)
    blank1 = np.zeros((size, size, 1), np.uint8)
    for i in range(n):
        try:
            f = decode_image(fg_bg[i], size, False, lib)
            m = decode_image(mask[i], size, True, lib)
            d = decode_image(depth[i], size, True, lib)
        except Exception as e:  # any corrupt sample is quarantined, never fatal
            ok[i] = False
            reasons[i] = f"{type(e).__name__}: {e}"[:200]
            f, m, d = blank3, blank1, blank1
        fgs.append(f)
        ms.append(m)
        ds.append(d)
    return resize_u8(fgs, size), resize_u8(ms, size)[:, 0], resize_u8(ds, size)[:, 0], ok, reasons


def _mix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def flip_decisions(sample_ids: np.ndarray, p: float, seed: int, chunk_index: int, epoch: int) -> np.ndarray:
    """Per-sample flip coin, a pure function of (seed, chunk, epoch, sample_id).

    Independent of world size, rank and batch position, so a resumed run flips exactly as an
    uninterrupted one.
    """
    if p <= 0:
        return np.zeros(len(sample_ids), dtype=bool)
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed * 1_000_003 + chunk_index * 7919 + epoch], dtype=np.int64))[0]
        z = _mix64(np.asarray(sample_ids, dtype=np.int64).astype(np.uint64) ^ key)
    return (z % np.uint64(1 << 24)).astype(np.float64) < p * (1 << 24)


class Normalizer:
    """Turns uint8 samples into the model's float tensors with the manifest's per-channel stats."""

    def __init__(self, stats: dict[str, dict[str, list[float]]]) -> None:
        def mv(k: str) -> tuple[torch.Tensor, torch.Tensor]:
            m = torch.tensor(stats[k]["mean"], dtype=torch.float32).view(1, -1, 1, 1) * 255.0
            s = torch.tensor(stats[k]["std"], dtype=torch.float32).view(1, -1, 1, 1) * 255.0
            return m, s

        self.fg_mean, self.fg_std = mv("fg_bg")
        self.bg_mean, self.bg_std = mv("bg" if "bg" in stats else "fg_bg")
        # (u - mean) / std as one multiply-add
        self.fg_scale, self.fg_shift = 1 / self.fg_std, -self.fg_mean / self.fg_std
        self.bg_scale, self.bg_shift = 1 / self.bg_std, -self.bg_mean / self.bg_std

    def __call__(
        self,
        fg: torch.Tensor,
        bg: torch.Tensor,
        mask: torch.Tensor,
        depth: torch.Tensor,
        flip: np.ndarray | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """fg, bg: n×3×S×S uint8; mask, depth: n×S×S uint8 -> x n×6×S×S, mask/depth n×1×S×S in [0,1].

        `flip[i]` mirrors sample i horizontally in all four images at once, so targets stay aligned.
        Fastest when the flipped samples come first (the stream orders each batch that way); otherwise
        the uint8 inputs are flipped in place, so pass tensors the caller owns.
        """
        n, _, h, w = fg.shape
        f = np.zeros(n, bool) if flip is None else np.asarray(flip, dtype=bool)
        k = int(f.sum())
        if k and not f[:k].all():  # not "flipped first": flip the uint8 rows in place (slower path)
            idx = torch.from_numpy(np.nonzero(f)[0])
            for t in (fg, bg, mask, depth):
                t[idx] = t.index_select(0, idx).flip(-1)
            k = 0
        x = torch.empty((n, 6, h, w), dtype=torch.float32)
        m = torch.empty((n, 1, h, w), dtype=torch.float32)
        d = torch.empty((n, 1, h, w), dtype=torch.float32)
        # rows [0, k) are flipped: mirror the small uint8 slices while widening them into the outputs
        for lo, hi, fl in ((0, k, True), (k, n, False)):
            if lo == hi:
                continue
            for src, dst in (
                (fg, x[lo:hi, :3]),
                (bg, x[lo:hi, 3:]),
                (mask, m[lo:hi, 0]),
                (depth, d[lo:hi, 0]),
            ):
                dst.copy_(src[lo:hi].flip(-1) if fl else src[lo:hi])
        x[:, :3].mul_(self.fg_scale).add_(self.fg_shift)
        x[:, 3:].mul_(self.bg_scale).add_(self.bg_shift)
        m.mul_(1 / 255.0)
        d.mul_(1 / 255.0)
        return {"x": x, "mask": m, "depth": d}
