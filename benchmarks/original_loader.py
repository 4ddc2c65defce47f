"""The original-style input pipeline, kept as the benchmark baseline (not used by training).

What the original notebooks did: extract the chunk's files from the zips to a directory, then a torch
`Dataset` that opens each file with PIL and applies per-sample transforms (resize, to-tensor, normalise,
random flip), fed by `DataLoader(num_workers=2)`.
"""

from __future__ import annotations

import csv
import os
import random
import zipfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


def extract_chunk(src_dir: str, out_dir: str, lo: int, hi: int) -> list[dict[str, str]]:
    """Extract the files of CSV rows [lo, hi) to `out_dir`; returns the rows with local paths."""
    with open(os.path.join(src_dir, "index.csv"), newline="") as f:
        rows = list(csv.DictReader(f))[lo:hi]
    os.makedirs(out_dir, exist_ok=True)
    zips: dict[str, zipfile.ZipFile] = {}
    out = []
    for i, r in enumerate(rows, start=lo):
        rec = {}
        for key, member, zname in (
            ("fg_bg", r["ImageName"], r["BaseImageFName"]),
            ("mask", r["MaskName"], r["BaseImageFName"]),
            ("depth", r["Depthname"], r["DepthImageFName"]),
            ("bg", r["BGImageName"], r["BGImageFName"]),
        ):
            z = zips.setdefault(zname, zipfile.ZipFile(os.path.join(src_dir, zname)))
            # flat, index-based names: the member name is never used as a path
            path = os.path.join(out_dir, f"{key}_{i}.jpg" if key != "bg" else f"bg_{abs(hash(member))}.jpg")
            if not os.path.exists(path):
                with open(path, "wb") as g:
                    g.write(z.read(member))
            rec[key] = path
        out.append(rec)
    for z in zips.values():
        z.close()
    return out


class OriginalDataset(Dataset):
    """One sample = four PIL opens + per-sample resize / to-tensor / normalise / flip."""

    def __init__(self, rows: list[dict[str, str]], size: int, stats: dict, flip_p: float = 0.5) -> None:
        self.rows, self.size, self.flip_p = rows, size, flip_p
        self.mean = {k: np.array(v["mean"], np.float32).reshape(-1, 1, 1) for k, v in stats.items()}
        self.std = {k: np.array(v["std"], np.float32).reshape(-1, 1, 1) for k, v in stats.items()}

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, path: str, mode: str) -> np.ndarray:
        im = Image.open(path).convert(mode).resize((self.size, self.size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
        return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.rows[i]
        fg = (self._load(r["fg_bg"], "RGB") - self.mean["fg_bg"]) / self.std["fg_bg"]
        bg = (self._load(r["bg"], "RGB") - self.mean["bg"]) / self.std["bg"]
        mask = self._load(r["mask"], "L")
        depth = self._load(r["depth"], "L")
        x = np.concatenate([fg, bg], 0)
        if random.random() < self.flip_p:
            x, mask, depth = x[..., ::-1], mask[..., ::-1], depth[..., ::-1]
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "depth": torch.from_numpy(np.ascontiguousarray(depth)),
        }


def original_loader(rows: list[dict[str, str]], size: int, stats: dict, batch_size: int) -> DataLoader:
    return DataLoader(
        OriginalDataset(rows, size, stats),
        batch_size=batch_size,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        persistent_workers=False,
    )
