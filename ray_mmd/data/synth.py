"""Synthetic MonoMaskDepth: procedural rooms + person sprites with exact mask/depth, in the original layout.

Output at OUT (any storage URL):
    OUT/index.csv                 ImageName, MaskName, Depthname, BGImageName, BaseImageFName,
                                  DepthImageFName, BGType, BGImageFName
    OUT/fg_bg_mask_NN.zip         fg_bg/<name>.jpg (250x250 RGB) + mask/<name>.jpg (250x250 gray)
    OUT/depth_NN.zip              depth/<name>.jpg (320x240 gray, brighter = nearer)
    OUT/bg.zip                    bg/<scene>_<k>.jpg (250x250 RGB)

Speed comes from rendering each bg (+ its depth) and each fg sprite (+ its flip) once; a sample is only a
paste, a depth fill and three JPEG encodes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import simplejpeg

from ray_mmd import storage
from ray_mmd.data.layout import COLUMNS  # the original index CSV's columns: one definition
from ray_mmd.data.procs import mp_context
from ray_mmd.data.scenes import (
    DEPTH_H,
    DEPTH_W,
    IMG,
    SCENES,
    Sprite,
    render_person,
    render_scene,
    scene_params,
    sprite,
)
from ray_mmd.errors import UserError

log = logging.getLogger(__name__)

CSV_NAME = "index.csv"
BG_ZIP = "bg.zip"
QUALITY = 85
PART_SAMPLES = 2500  # samples per fg_bg/mask part zip (the original shipped several parts)
# ---------------------------------------------------------------------------------------------
# assets + per-sample plan


@dataclass
class Assets:
    bg_rgb: np.ndarray  # B x 250 x 250 x 3 uint8
    bg_dist: np.ndarray  # B x 240 x 320 float32, z distance in metres
    bg_scale: np.ndarray  # B, brightness = 255 * scale / dist
    bg_depth: np.ndarray  # B x 240 x 320 uint8
    bg_types: list[str]
    bg_names: list[str]
    sprites: list[Sprite]  # 2 per fg: [fg0, fg0 flipped, fg1, ...]


def depth_to_u8(dist: np.ndarray, scale: float) -> np.ndarray:
    """Inverse-distance brightness (brighter = nearer), like a monocular depth model's output."""
    return np.clip(np.rint(255.0 * scale / dist), 0, 255).astype(np.uint8)


def _render_bg(p: dict) -> tuple[np.ndarray, np.ndarray]:
    rgb, _ = render_scene(p, IMG, IMG, rgb=True)
    _, dist = render_scene(p, DEPTH_W, DEPTH_H, rgb=False)
    return rgb, dist


def build_assets(bgs: int, fgs: int, seed: int, workers: int = 1) -> Assets:
    """Render every bg (+ depth) and every fg sprite (+ flip) once; deterministic for a seed."""
    rng = np.random.default_rng([seed, 1])
    params = [scene_params(rng, SCENES[b % len(SCENES)]) for b in range(bgs)]
    if workers > 1 and bgs > 8:
        with ProcessPoolExecutor(workers, mp_context=mp_context()) as ex:
            rendered = list(ex.map(_render_bg, params, chunksize=max(1, bgs // (4 * workers))))
    else:
        rendered = [_render_bg(p) for p in params]
    rgbs, dists, scales, types, names = [], [], [], [], []
    for b, (p, (rgb, dist)) in enumerate(zip(params, rendered, strict=True)):
        scene = p["scene"]
        scale = 0.65 * float(np.percentile(dist, 2))
        rgbs.append(rgb)
        dists.append(dist)
        scales.append(scale)
        types.append(scene)
        names.append(f"bg/{scene}_{b:03d}.jpg")
    frng = np.random.default_rng([seed, 2])
    sprites = []
    for _ in range(fgs):
        rgb, mask, relief = render_person(frng)
        sprites.append(sprite(rgb, mask, relief))
        sprites.append(sprite(rgb[:, ::-1].copy(), mask[:, ::-1].copy(), relief[:, ::-1].copy()))
    bg_dist = np.stack(dists)
    bg_scale = np.array(scales, np.float32)
    bg_depth = np.stack([depth_to_u8(d, s) for d, s in zip(dists, scales, strict=True)])
    return Assets(np.stack(rgbs), bg_dist, bg_scale, bg_depth, types, names, sprites)


def plan(samples: int, bgs: int, fgs: int, seed: int) -> dict[str, np.ndarray]:
    """Per-sample random choices (bg, fg, flip, position, nearness), all drawn up front."""
    rng = np.random.default_rng([seed, 3])
    return {
        "bg": rng.integers(0, bgs, samples),
        "fg": rng.integers(0, fgs, samples),
        "flip": rng.integers(0, 2, samples),
        "fx": rng.uniform(0, 1, samples),
        "fy": rng.uniform(0, 1, samples),
        "flying": rng.uniform(0, 1, samples) < 0.15,  # the original pasted some fgs mid-air
        "near": rng.uniform(0.6, 0.9, samples),  # fg distance / nearest bg distance behind it
    }


def sample_name(i: int, pl: dict[str, np.ndarray], j: int | None = None) -> str:
    """Name of sample i; j = its row in `pl` when `pl` is a slice of the plan."""
    j = i if j is None else j
    f = "f" if pl["flip"][j] else ""
    return f"{i:07d}_bg{int(pl['bg'][j]):03d}_fg{int(pl['fg'][j]):03d}{f}.jpg"


def render_sample(
    assets: Assets, pl: dict[str, np.ndarray], i: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact (fg_bg RGB uint8, mask bool, depth uint8 240x320) for sample i, before JPEG."""
    b = int(pl["bg"][i])
    sp = assets.sprites[2 * int(pl["fg"][i]) + int(pl["flip"][i])]
    h, w = sp.mask.shape
    x = int(pl["fx"][i] * (IMG - w))
    if pl["flying"][i]:
        y = int(pl["fy"][i] * (IMG - h))
    else:  # feet in the lower part of the frame, on the floor
        y = IMG - h - int(pl["fy"][i] * min(40, IMG - h))
    img = assets.bg_rgb[b].copy()
    region = img[y : y + h, x : x + w]
    region[sp.mask] = sp.rgb[sp.mask]
    mask = np.zeros((IMG, IMG), bool)
    mask[y : y + h, x : x + w] = sp.mask

    depth = assets.bg_depth[b].copy()
    yd, xd = y * DEPTH_H // IMG, x * DEPTH_W // IMG
    md = sp.mask_d[: DEPTH_H - yd, : DEPTH_W - xd]
    rel = sp.relief_d[: md.shape[0], : md.shape[1]]
    behind = assets.bg_dist[b, yd : yd + md.shape[0], xd : xd + md.shape[1]]
    d_fg = float(behind[md].min()) * float(pl["near"][i]) * (1 - 0.08 * rel)  # nearer than anything behind
    dreg = depth[yd : yd + md.shape[0], xd : xd + md.shape[1]]
    dreg[md] = depth_to_u8(d_fg, float(assets.bg_scale[b]))[md]
    return img, mask, depth


def encode_rgb(a: np.ndarray) -> bytes:
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(a), quality=QUALITY, colorspace="RGB", colorsubsampling="420"
    )


def encode_gray(a: np.ndarray) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(a)[..., None], quality=QUALITY, colorspace="GRAY")


# ---------------------------------------------------------------------------------------------
# writing the layout

_ASSETS: Assets | None = None


def _init_worker(assets: Assets) -> None:
    global _ASSETS
    _ASSETS = assets


def _zip_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    # JPEGs do not deflate; storing keeps generation fast (the members are identical either way)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # fixed time: byte-identical reruns
            zf.writestr(zi, data)
    return buf.getvalue()


def _write_part(out_url: str, part: int, lo: int, pl: dict[str, np.ndarray]) -> int:
    """Render + encode samples lo.. (pl is the plan sliced to this part) into one part zip pair."""
    assets = _ASSETS
    assert assets is not None
    base, dep = [], []
    n = len(pl["bg"])
    for j in range(n):
        img, mask, depth = render_sample(assets, pl, j)
        name = sample_name(lo + j, pl, j)
        base.append((f"fg_bg/{name}", encode_rgb(img)))
        base.append((f"mask/{name}", encode_gray(mask.astype(np.uint8) * 255)))
        dep.append((f"depth/{name}", encode_gray(depth)))
    storage.write_bytes_atomic(storage.join(out_url, _part_zip("fg_bg_mask", part)), _zip_bytes(base))
    storage.write_bytes_atomic(storage.join(out_url, _part_zip("depth", part)), _zip_bytes(dep))
    return n


def _cut(pl: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {k: v[lo:hi] for k, v in pl.items()}


def _part_zip(kind: str, part: int) -> str:
    return f"{kind}_{part + 1:02d}.zip"


def generate(
    out_url: str,
    samples: int,
    bgs: int = 10,
    fgs: int = 5,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
    part_samples: int = PART_SAMPLES,
) -> None:
    """Write a synthetic dataset in the original MonoMaskDepth layout to `out_url` (deterministic)."""
    if samples < 1 or bgs < 1 or fgs < 1:
        raise UserError(f"--samples, --bgs and --fgs must be >= 1 (got {samples}, {bgs}, {fgs})")
    if storage.split_url(out_url)[0] == "gs":
        bucket = storage.split_url(out_url)[1].split("/", 1)[0]
        if not storage.exists(f"gs://{bucket}"):
            raise UserError(f"bucket gs://{bucket} does not exist: create it or fix the --out URL")
    fs, path = storage.filesystem(out_url)
    try:
        fs.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output {out_url!r} ({e}): choose a writable location") from e

    n_parts = min(samples, max(2, math.ceil(samples / part_samples)))
    bounds = [(k, samples * k // n_parts, samples * (k + 1) // n_parts) for k in range(n_parts)]
    workers = min(workers or os.cpu_count() or 1, n_parts)
    assets = build_assets(bgs, fgs, seed, workers)
    pl = plan(samples, bgs, fgs, seed)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=samples, unit="sample", desc="synth")
    if workers <= 1:
        _init_worker(assets)
        for k, lo, hi in bounds:
            n = _write_part(out_url, k, lo, _cut(pl, lo, hi))
            if bar:
                bar.update(n)
    else:
        with ProcessPoolExecutor(
            workers, mp_context=mp_context(), initializer=_init_worker, initargs=(assets,)
        ) as ex:
            futs = [ex.submit(_write_part, out_url, k, lo, _cut(pl, lo, hi)) for k, lo, hi in bounds]
            for f in as_completed(futs):
                n = f.result()
                if bar:
                    bar.update(n)
    if bar:
        bar.close()

    storage.write_bytes_atomic(
        storage.join(out_url, BG_ZIP),
        _zip_bytes([(assets.bg_names[b], encode_rgb(assets.bg_rgb[b])) for b in range(bgs)]),
    )
    text = io.StringIO()
    wr = csv.writer(text, lineterminator="\n")
    wr.writerow(COLUMNS)
    for k, lo, hi in bounds:
        for i in range(lo, hi):
            name = sample_name(i, pl)
            b = int(pl["bg"][i])
            wr.writerow(
                [
                    f"fg_bg/{name}",
                    f"mask/{name}",
                    f"depth/{name}",
                    assets.bg_names[b],
                    _part_zip("fg_bg_mask", k),
                    _part_zip("depth", k),
                    assets.bg_types[b],
                    BG_ZIP,
                ]
            )
    # the CSV last: a layout without its index is visibly incomplete
    storage.write_bytes_atomic(storage.join(out_url, CSV_NAME), text.getvalue().encode())
    log.info("wrote %d samples (%d bgs, %d fgs) to %s", samples, bgs, fgs, out_url)
