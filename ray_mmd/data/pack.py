"""Pack a MonoMaskDepth layout into parquet shards + bg.parquet + manifest.json (see manifest.py).

Each shard holds the CSV rows [k*shard_size, (k+1)*shard_size) that pass verification (decode by content,
size and mode); the rest are quarantined with a reason. Image bytes are copied, never re-encoded. Every
finished shard gets a sidecar (shards/shard-NNNNN.json: its ShardInfo, quarantine and pixel histograms),
so a re-run skips shards whose sidecar and sha256 still match, and the stats come from one streaming pass
(per-channel 256-bin histograms on a 2x2 pixel grid, merged exactly). manifest.json is written last, atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_mmd import storage
from ray_mmd.data import manifest as mf
from ray_mmd.data.destination import (
    QUARANTINE_NAME,
    SHARD_DIR,
    check_destination,
    prepare_destination,
    remove_stale_shards,
)
from ray_mmd.data.layout import Layout, SampleError, ZipReader, decode, read_sample
from ray_mmd.data.procs import mp_context
from ray_mmd.errors import UserError

log = logging.getLogger(__name__)

# (width, height, channels) each image kind must have
EXPECTED = {"fg_bg": (250, 250, 3), "bg": (250, 250, 3), "mask": (250, 250, 1), "depth": (320, 240, 1)}
ROW_GROUP = 256  # rows per parquet row group: a reader can skip inside a shard
PACK_VERSION = 1  # bump when the shard content rules change, so old sidecars are not trusted


def _check(kind: str, data: bytes) -> np.ndarray:
    a = decode(data)
    w, h, c = EXPECTED[kind]
    ac = 1 if a.ndim == 2 else a.shape[2]
    if a.shape[0] != h or a.shape[1] != w or ac != c:
        mode = "grayscale" if ac == 1 else "RGB"
        want = "grayscale" if c == 1 else "RGB"
        raise SampleError(f"{kind} is {a.shape[1]}x{a.shape[0]} {mode}, expected {w}x{h} {want}", "shape")
    return a


def _hist(a: np.ndarray) -> np.ndarray:
    """(channels, 256) int64 histogram over every other pixel in each direction.

    A regular 2x2 grid keeps mean/std unbiased at a quarter of the cost (bincount dominates packing).
    """
    a = a[::2, ::2]
    if a.ndim == 2:
        return np.bincount(a.ravel(), minlength=256)[None, :]
    return np.stack([np.bincount(a[..., c].ravel(), minlength=256) for c in range(a.shape[2])])


def _stats(h: np.ndarray) -> dict[str, list[float]]:
    v = np.arange(256) / 255.0
    n = np.maximum(h.sum(1), 1)
    mean = (h * v).sum(1) / n
    var = np.maximum((h * v * v).sum(1) / n - mean**2, 0)
    return {"mean": [float(x) for x in mean], "std": [float(x) for x in np.sqrt(var)]}


def _sha256_url(url: str) -> str:
    fs, path = storage.filesystem(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _shard_rel(k: int) -> str:
    return f"{SHARD_DIR}/shard-{k:05d}.parquet"


def _sidecar_rel(k: int) -> str:
    return f"{SHARD_DIR}/shard-{k:05d}.json"


def _pack_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Verify + copy rows [lo, hi) into one shard; returns its sidecar content (also written to DST)."""
    zips: ZipReader = task["zips"]
    lo: int = task["lo"]
    cols: dict[str, list] = {f.name: [] for f in mf.SHARD_SCHEMA}
    quarantine: list[dict[str, Any]] = []
    hist = {k: np.zeros((EXPECTED[k][2], 256), np.int64) for k in ("fg_bg", "mask", "depth")}
    bg_used: dict[int, int] = {}
    for j, row in enumerate(task["rows"]):
        sid = lo + j
        bg_id, bg_reason = task["bg_ids"][j]
        try:
            if bg_id < 0:
                raise SampleError(bg_reason, "bg")
            if not (row.image_name and row.mask_name and row.depth_name and row.base_zip and row.depth_zip):
                raise SampleError("CSV row has empty fields", "row")
            data = {
                "fg_bg": zips.read(row.base_zip, row.image_name),
                "mask": zips.read(row.base_zip, row.mask_name),
                "depth": zips.read(row.depth_zip, row.depth_name),
            }
            arrs = {k: _check(k, v) for k, v in data.items()}
        except SampleError as e:
            quarantine.append({"sample_id": sid, "name": row.image_name, "reason": str(e), "kind": e.kind})
            continue
        for k, a in arrs.items():
            hist[k] += _hist(a)
        bg_used[bg_id] = bg_used.get(bg_id, 0) + 1
        cols["sample_id"].append(sid)
        cols["fg_bg"].append(data["fg_bg"])
        cols["mask"].append(data["mask"])
        cols["depth"].append(data["depth"])
        cols["bg_id"].append(bg_id)
        cols["bg_type"].append(row.bg_type)
        cols["image_name"].append(row.image_name)
        cols["mask_name"].append(row.mask_name)
        cols["depth_name"].append(row.depth_name)
        cols["bg_name"].append(row.bg_name)
    zips.close()
    info = None
    k = task["k"]
    if cols["sample_id"]:
        buf = io.BytesIO()
        table = pa.Table.from_pydict(cols, schema=mf.SHARD_SCHEMA)
        pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="zstd")
        raw = buf.getvalue()
        storage.write_bytes_atomic(storage.join(task["dst"], _shard_rel(k)), raw)
        info = mf.ShardInfo(
            path=_shard_rel(k),
            rows=len(cols["sample_id"]),
            first_id=cols["sample_id"][0],
            last_id=cols["sample_id"][-1],
            sha256=hashlib.sha256(raw).hexdigest(),
            bytes=len(raw),
        )
    side = {
        "key": task["key"],
        "info": dataclasses.asdict(info) if info else None,
        "quarantine": quarantine,
        "hist": {kk: v.tolist() for kk, v in hist.items()},
        "bg_used": {str(b): n for b, n in bg_used.items()},
    }
    storage.write_bytes_atomic(storage.join(task["dst"], _sidecar_rel(k)), json.dumps(side).encode())
    return side


def _verified(dst: str, k: int, key: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar of shard k if it matches this pack's key and the shard's sha256 still checks out."""
    url = storage.join(dst, _sidecar_rel(k))
    try:
        side = json.loads(storage.read_bytes(url))
    except (FileNotFoundError, ValueError):
        return None
    if side.get("key") != key:
        return None
    info = side.get("info")
    if info is not None:
        try:
            if _sha256_url(storage.join(dst, info["path"])) != info["sha256"]:
                return None
        except FileNotFoundError:
            return None
    return side


def _pack_bgs(layout: Layout, dst: str) -> tuple[dict[tuple[str, str], tuple[int, str]], mf.ShardInfo, dict]:
    """Verify every distinct bg once; write bg.parquet. Returns {(zip, name): (bg_id or -1, reason)}."""
    ids: dict[tuple[str, str], tuple[int, str]] = {}
    cols: dict[str, list] = {"bg_id": [], "name": [], "bg_type": [], "image": []}
    hists: dict[int, np.ndarray] = {}
    for row in layout.rows():
        key = (row.bg_zip, row.bg_name)
        if key in ids:
            continue
        try:
            if not row.bg_zip or not row.bg_name:
                raise SampleError("CSV row has no bg", "row")
            data = layout.zips.read(row.bg_zip, row.bg_name)
            a = _check("bg", data)
        except SampleError as e:
            ids[key] = (-1, f"bg {row.bg_name}: {e}")
            continue
        bid = len(cols["bg_id"])
        ids[key] = (bid, "")
        hists[bid] = _hist(a)
        cols["bg_id"].append(bid)
        cols["name"].append(row.bg_name)
        cols["bg_type"].append(row.bg_type)
        cols["image"].append(data)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(cols, schema=mf.BG_SCHEMA), buf, compression="zstd")
    raw = buf.getvalue()
    storage.write_bytes_atomic(storage.join(dst, mf.BG_NAME), raw)
    n = len(cols["bg_id"])
    info = mf.ShardInfo(mf.BG_NAME, n, 0, n - 1, hashlib.sha256(raw).hexdigest(), len(raw))
    return ids, info, hists


def _check_args(shard_size: int, test_fraction: float, max_bad_fraction: float) -> None:
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1 (got {shard_size})")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"--test-fraction must be in [0, 1) (got {test_fraction})")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction must be in [0, 1] (got {max_bad_fraction})")


def _plan_shards(
    layout: Layout, src_url: str, dst_url: str, shard_size: int, bg_ids: dict
) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """(sidecars of shards already packed and verified, tasks for the rest)."""
    n = len(layout)
    bg_key = hashlib.sha256(json.dumps(sorted(map(list, bg_ids.items()))).encode()).hexdigest()
    done: dict[int, dict[str, Any]] = {}
    todo = []
    for k in range(math.ceil(n / shard_size)):
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        rows = layout.rows(lo, hi)
        key = {
            "v": PACK_VERSION,
            "src": src_url,
            "lo": lo,
            "hi": hi,
            "rows": hashlib.sha256(
                json.dumps([list(dataclasses.astuple(r)) for r in rows]).encode()
            ).hexdigest(),
            "bg": bg_key,  # the bg ids this shard refers to are part of what it means
        }
        side = _verified(dst_url, k, key)
        if side is not None:
            done[k] = side
            continue
        bgs = [bg_ids[(r.bg_zip, r.bg_name)] for r in rows]
        todo.append(
            {"k": k, "lo": lo, "rows": rows, "bg_ids": bgs, "zips": layout.zips, "dst": dst_url, "key": key}
        )
    return done, todo


def _packed(todo: list[dict[str, Any]], workers: int) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """[(k, sidecar)] of the tasks that finished together: here when one worker, else in worker
    processes. Closing the iterator early cancels the tasks not yet started."""
    if workers <= 1:
        for t in todo:
            yield [(t["k"], _pack_shard(t))]
        return
    with ProcessPoolExecutor(workers, mp_context=mp_context()) as ex:
        pending = {ex.submit(_pack_shard, t): t["k"] for t in todo}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                yield [(pending.pop(f), f.result()) for f in done]
        finally:
            for f in pending:
                f.cancel()


def _pack_within_budget(
    todo: list[dict[str, Any]], results: dict[int, dict[str, Any]], workers: int, limit: int, progress: bool
) -> bool:
    """Pack `todo` into `results`; stop as soon as more than `limit` samples are bad. True if stopped."""

    def over_budget() -> bool:
        return sum(len(s["quarantine"]) for s in results.values()) > limit

    if over_budget():
        return True
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(results) + len(todo), initial=len(results), unit="shard", desc="pack")
    stream = _packed(todo, min(workers, max(len(todo), 1)))
    try:
        for finished in stream:
            for k, side in finished:
                results[k] = side
                if bar:
                    bar.update(1)
            if over_budget():
                return True
        return False
    finally:
        stream.close()
        if bar:
            bar.close()


def _manifest(
    results: dict[int, dict[str, Any]],
    quarantine: list[dict[str, Any]],
    n: int,
    bg: tuple[mf.ShardInfo, dict[int, np.ndarray]],
    src_url: str,
    dst_url: str,
    split_seed: int,
    test_fraction: float,
) -> mf.Manifest:
    """The manifest of a finished pack: shards, split counts and pixel stats merged from the sidecars."""
    bg_info, bg_hists = bg
    shards = [mf.ShardInfo(**results[k]["info"]) for k in sorted(results) if results[k]["info"]]
    hist = {k: np.zeros((EXPECTED[k][2], 256), np.int64) for k in ("fg_bg", "mask", "depth")}
    bg_hist = np.zeros((3, 256), np.int64)
    for s in results.values():
        for k in hist:
            hist[k] += np.asarray(s["hist"][k], np.int64)
        for b, cnt in s["bg_used"].items():
            bg_hist += bg_hists[int(b)] * cnt  # weighted by use: what a training batch sees
    num = sum(s.rows for s in shards)
    bad = np.fromiter((q["sample_id"] for q in quarantine), np.int64)
    good = np.setdiff1d(np.arange(n, dtype=np.int64), bad)
    n_test = int(mf.is_test(good, split_seed, test_fraction).sum())
    return mf.Manifest(
        num_samples=num,
        shards=shards,
        bg=bg_info,
        split_seed=split_seed,
        test_fraction=test_fraction,
        split_counts={"train": num - n_test, "test": n_test},
        stats={**{k: _stats(h) for k, h in hist.items()}, "bg": _stats(bg_hist)},
        sizes={k: [w, h] for k, (w, h, _) in EXPECTED.items()},
        quarantine=quarantine,
        source=src_url,
        root=dst_url,
    )


def pack(
    src_url: str,
    dst_url: str,
    shard_size: int = 1000,
    test_fraction: float = 0.3,
    split_seed: int = 0,
    max_bad_fraction: float = 0.01,
    workers: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> mf.Manifest:
    """Pack the layout at `src_url` into `dst_url`; re-running completes a partial pack, skipping verified
    shards. A destination holding anything else (another dataset, foreign files) needs `overwrite`."""
    _check_args(shard_size, test_fraction, max_bad_fraction)
    layout = Layout(src_url)
    n = len(layout)
    if n == 0:
        raise UserError(f"{layout.csv_url!r} has no rows: nothing to pack")
    if not overwrite:
        check_destination(src_url, dst_url)
    prepare_destination(dst_url)
    bg_ids, bg_info, bg_hists = _pack_bgs(layout, dst_url)
    results, todo = _plan_shards(layout, src_url, dst_url, shard_size, bg_ids)
    if results:
        log.info(
            "%d of %d shards already packed and verified; skipping them",
            len(results),
            len(results) + len(todo),
        )
    try:
        limit = math.floor(max_bad_fraction * n)
        aborted = _pack_within_budget(todo, results, workers or os.cpu_count() or 1, limit, progress)
    finally:
        layout.close()

    quarantine = sorted((q for s in results.values() for q in s["quarantine"]), key=lambda q: q["sample_id"])
    q_url = storage.join(dst_url, QUARANTINE_NAME)
    storage.write_bytes_atomic(q_url, json.dumps(quarantine, indent=1).encode())
    if aborted:
        raise UserError(
            f"more than {max_bad_fraction:.2%} of {n} samples are bad ({len(quarantine)} so far, e.g. "
            f"{quarantine[0]['reason']!r}); see {q_url}, fix the source or raise --max-bad-fraction"
        )
    man = _manifest(results, quarantine, n, (bg_info, bg_hists), src_url, dst_url, split_seed, test_fraction)
    remove_stale_shards(dst_url, set(results))  # before the manifest: a finished pack holds only its own
    man.save(dst_url)
    log.info(
        "packed %d samples (%d quarantined) into %d shards at %s",
        man.num_samples,
        len(quarantine),
        len(man.shards),
        dst_url,
    )
    return man


def make_synthetic(
    dst_url: str, samples: int, shard_size: int, seed: int = 0, **synth_kw: Any
) -> mf.Manifest:
    """Generate a synthetic source in a temp dir, pack it to `dst_url`, drop the source; returns the manifest.

    Extra keywords go to `synth.generate` (bgs, fgs, ...) or `pack` (test_fraction, split_seed, ...).
    """
    from ray_mmd.data import synth

    gen_keys = set(inspect.signature(synth.generate).parameters)
    pack_keys = set(inspect.signature(pack).parameters)
    unknown = set(synth_kw) - gen_keys - pack_keys
    if unknown:
        raise TypeError(f"make_synthetic got unknown keyword(s) {sorted(unknown)}")
    if not synth_kw.get("overwrite"):
        check_destination(
            None, dst_url
        )  # foreign files or another tool's manifest: refused, as by `data pack`
    src = tempfile.mkdtemp(prefix="ray-mmd-src-")
    try:
        synth.generate(src, samples, seed=seed, **{k: v for k, v in synth_kw.items() if k in gen_keys})
        return pack(
            src,
            dst_url,
            shard_size=shard_size,
            overwrite=True,  # checked above; the temp source differs from any earlier pack's
            **{
                k: v
                for k, v in synth_kw.items()
                if k in pack_keys and k not in ("src_url", "dst_url", "overwrite")
            },
        )
    finally:
        shutil.rmtree(src, ignore_errors=True)


__all__ = ["pack", "make_synthetic", "EXPECTED", "read_sample"]
