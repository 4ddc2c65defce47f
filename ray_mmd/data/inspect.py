"""Summarize a packed dataset (counts, splits, stats, quarantine) and draw a contact sheet PNG."""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ray_mmd import storage
from ray_mmd.data import manifest as mf
from ray_mmd.data.layout import decode

TILE = 128


def summarize(man: mf.Manifest) -> dict[str, Any]:
    """Counts, splits, stats and a quarantine summary from the manifest alone (no shard is opened)."""
    q = man.quarantine
    by_kind = Counter(e.get("kind", "other") for e in q)
    return {
        "root": man.root,
        "source": man.source,
        "samples": man.num_samples,
        "quarantined": len(q),
        "shards": len(man.shards),
        "bgs": man.bg.rows,
        "bytes": sum(s.bytes for s in man.shards) + man.bg.bytes,
        "splits": dict(man.split_counts),
        "split_seed": man.split_seed,
        "test_fraction": man.test_fraction,
        "id_range": [min((s.first_id for s in man.shards), default=0), man.id_end],
        "stats": man.stats,
        "sizes": man.sizes,
        "quarantine_by_kind": dict(sorted(by_kind.items())),
        "quarantine_examples": q[:5],
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"dataset   {s['root']}  (from {s['source']})",
        f"samples   {s['samples']} packed, {s['quarantined']} quarantined; ids {s['id_range'][0]}..{s['id_range'][1] - 1}",
        f"storage   {s['shards']} shards + {s['bgs']} bgs stored once, {s['bytes'] / 1e6:.1f} MB",
        "splits    "
        + ", ".join(f"{k} {v}" for k, v in s["splits"].items())
        + f"  (seed {s['split_seed']}, test fraction {s['test_fraction']})",
        "sizes     " + ", ".join(f"{k} {w}x{h}" for k, (w, h) in s["sizes"].items()),
        "stats     [0,1] units",
    ]
    for k, st in s["stats"].items():
        mean = " ".join(f"{x:.4f}" for x in st["mean"])
        std = " ".join(f"{x:.4f}" for x in st["std"])
        lines.append(f"  {k:<7} mean {mean}  std {std}")
    if s["quarantined"]:
        lines.append("quarantine " + ", ".join(f"{k} {v}" for k, v in s["quarantine_by_kind"].items()))
        for e in s["quarantine_examples"]:
            lines.append(f"  #{e['sample_id']} {e['name']}: {e['reason']}")
    else:
        lines.append("quarantine none")
    return "\n".join(lines)


def _tile(a: np.ndarray) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(a).convert("RGB").resize((TILE, TILE), Image.BILINEAR)
    return np.asarray(im)


def contact_sheet(man: mf.Manifest, n: int = 6) -> bytes:
    """PNG bytes: one row per sample, columns fg_bg | bg | mask | depth (first samples of the first shard)."""
    from PIL import Image

    if not man.shards:
        raise ValueError("dataset has no shards")
    pafs, path = storage.pyarrow_filesystem(man.url(man.shards[0].path))
    rows = (
        pq.read_table(path, filesystem=pafs, columns=["fg_bg", "mask", "depth", "bg_id"])
        .slice(0, n)
        .to_pylist()
    )
    bpafs, bpath = storage.pyarrow_filesystem(man.url(man.bg.path))
    bgs = {r["bg_id"]: r["image"] for r in pq.read_table(bpath, filesystem=bpafs).to_pylist()}
    gap = 2
    sheet = np.full((len(rows) * (TILE + gap), 4 * (TILE + gap), 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, data in enumerate((r["fg_bg"], bgs[r["bg_id"]], r["mask"], r["depth"])):
            y, x = i * (TILE + gap), j * (TILE + gap)
            sheet[y : y + TILE, x : x + TILE] = _tile(decode(data))
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    return buf.getvalue()


def inspect(url: str, png: str | None = None, n: int = 6) -> dict[str, Any]:
    """Load the manifest at `url`, summarize it and optionally write a contact sheet to `png` (any URL)."""
    man = mf.load(url)
    s = summarize(man)
    if png:
        storage.write_bytes_atomic(png, contact_sheet(man, n))
        s["png"] = png
    return s
