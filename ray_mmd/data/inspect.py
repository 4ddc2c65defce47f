"""Summarize a packed dataset (counts, splits, stats, quarantine) and draw a contact sheet PNG."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_mmd import storage
from ray_mmd.data import manifest as mf
from ray_mmd.data.layout import SampleError, decode
from ray_mmd.errors import UserError

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


def _read_verified(man: mf.Manifest, info: mf.ShardInfo, columns: list[str] | None = None) -> pa.Table:
    """Read one file of the dataset after checking its size and sha256 against the manifest.

    A truncated, replaced or missing file is a one-line UserError naming it, not a parquet traceback.
    """
    url = man.url(info.path)
    fix = f"the dataset is damaged: re-pack it with `ray-mmd data pack SRC {man.root}`"
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise UserError(f"{url!r} is listed in the manifest but missing: {fix}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {url!r} ({type(e).__name__}: {e}): {fix}") from None
    if len(data) != info.bytes:
        raise UserError(f"{url!r} has {len(data)} bytes, the manifest says {info.bytes} (truncated?): {fix}")
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise UserError(f"{url!r} does not match its sha256 in the manifest: {fix}")
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{url!r} is not a readable shard ({msg}): {fix}") from None


def contact_sheet(man: mf.Manifest, n: int = 6) -> bytes:
    """PNG bytes: one row per sample, columns fg_bg | bg | mask | depth (first samples of the first shard)."""
    from PIL import Image

    if not man.shards:
        raise UserError(f"dataset {man.root!r} has no shards to draw: pack some samples into it first")
    try:
        rows = _read_verified(man, man.shards[0], ["fg_bg", "mask", "depth", "bg_id"]).slice(0, n).to_pylist()
        bgs = {r["bg_id"]: r["image"] for r in _read_verified(man, man.bg, ["bg_id", "image"]).to_pylist()}
    except KeyError as e:  # a column the schema promises is absent
        raise UserError(f"a shard of {man.root!r} lacks column {e}: re-pack the dataset") from None
    gap = 2
    sheet = np.full((len(rows) * (TILE + gap), 4 * (TILE + gap), 3), 255, np.uint8)
    for i, r in enumerate(rows):
        if r["bg_id"] not in bgs:
            raise UserError(
                f"sample row {i} of {man.shards[0].path} names bg_id {r['bg_id']} not in bg.parquet: re-pack"
            )
        for j, data in enumerate((r["fg_bg"], bgs[r["bg_id"]], r["mask"], r["depth"])):
            y, x = i * (TILE + gap), j * (TILE + gap)
            try:
                img = decode(data)
            except SampleError as e:
                raise UserError(
                    f"row {i} of {man.url(man.shards[0].path)!r}: {e}: re-pack the dataset"
                ) from None
            sheet[y : y + TILE, x : x + TILE] = _tile(img)
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    return buf.getvalue()


def inspect(url: str, png: str | None = None, n: int = 6) -> dict[str, Any]:
    """Load the manifest at `url`, summarize it and optionally write a contact sheet to `png` (any URL)."""
    man = mf.load(url)
    s = summarize(man)
    if png:
        storage.check_reachable(png, what="--png URL")  # before drawing, not after
        sheet = contact_sheet(man, n)
        try:
            storage.write_bytes_atomic(png, sheet)
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot write the contact sheet to {png!r} ({type(e).__name__}: {e}): choose a writable file path"
            ) from None
        s["png"] = png
    return s
