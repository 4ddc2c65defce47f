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

import colorsys
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
from ray_mmd.errors import UserError

log = logging.getLogger(__name__)

CSV_NAME = "index.csv"
BG_ZIP = "bg.zip"
IMG = 250  # fg_bg, bg, mask: IMG x IMG
DEPTH_W, DEPTH_H = 320, 240
SIZES = {"fg_bg": [IMG, IMG], "bg": [IMG, IMG], "mask": [IMG, IMG], "depth": [DEPTH_W, DEPTH_H]}
QUALITY = 85
PART_SAMPLES = 2500  # samples per fg_bg/mask part zip (the original shipped several parts)
FAR = 80.0  # distance of the sky, metres
SCENES = ("classroom", "college_outdoor", "corridor", "dining_room", "lobby", "mall", "meeting_room")

# per scene: room width, height, depth (m), floor kind, wall palette, number of boxes (furniture)
_SCENE_CFG = {
    "classroom": ((7, 9), (3.0, 3.4), (8, 11), "tiles", [(222, 214, 182), (196, 206, 196)], (4, 8)),
    "college_outdoor": ((18, 30), (8, 14), (35, 60), "grass", [(170, 120, 100), (190, 180, 165)], (0, 3)),
    "corridor": ((2.4, 3.4), (2.6, 3.0), (18, 30), "tiles", [(215, 215, 210), (200, 196, 185)], (0, 1)),
    "dining_room": ((5, 7), (2.6, 3.0), (6, 8), "wood", [(214, 190, 160), (190, 170, 150)], (1, 3)),
    "lobby": ((10, 14), (4, 5), (12, 16), "marble", [(205, 200, 190), (180, 175, 170)], (1, 4)),
    "mall": ((12, 18), (5, 7), (25, 40), "tiles", [(210, 210, 215), (190, 195, 200)], (2, 5)),
    "meeting_room": ((5, 6), (2.6, 3.0), (6, 8), "carpet", [(200, 200, 195), (175, 185, 190)], (1, 2)),
}


# ---------------------------------------------------------------------------------------------
# backgrounds: a room box in perspective, ray-cast per pixel


def _scene_params(rng: np.random.Generator, scene: str) -> dict:
    (w0, w1), (h0, h1), (d0, d1), floor, walls, (b0, b1) = _SCENE_CFG[scene]
    W, H, D = rng.uniform(w0, w1), rng.uniform(h0, h1), rng.uniform(d0, d1)
    hc = rng.uniform(1.3, 1.7)
    cx = rng.uniform(-0.25, 0.25) * W
    wall = np.array(walls[rng.integers(len(walls))], float) * rng.uniform(0.9, 1.05)
    boxes = []
    for _ in range(rng.integers(b0, b1 + 1)):
        bw, bh, bd = rng.uniform(0.6, 2.0), rng.uniform(0.5, 1.1), rng.uniform(0.5, 1.5)
        x = rng.uniform(-W / 2, W / 2 - bw) - cx
        z = rng.uniform(2.5, D * 0.8)
        boxes.append((x, x + bw, -hc, -hc + bh, z, z + bd, rng.uniform(60, 160, 3)))
    # decorations per wall: (a0, a1, b0, b1, rgb) in wall coords (a along the wall, b = height above floor)
    decos = {}
    for s, length in ((2, D), (3, D), (4, W)):
        items = []
        for _ in range(rng.integers(2, 6)):
            aw = rng.uniform(0.6, 2.5)
            a = rng.uniform(0, max(length - aw, 0.1)) - (W / 2 if s == 4 else 0)
            bb = rng.uniform(0.0, 1.2) if scene != "college_outdoor" else rng.uniform(0.5, H - 2)
            bh = rng.uniform(0.6, 1.6)
            col = rng.uniform(40, 200, 3) * np.array([1.0, 0.95, 0.9])
            items.append((a, a + aw, bb, bb + bh, col))
        decos[s] = items
    return {
        "scene": scene,
        "W": W,
        "H": H,
        "D": D,
        "hc": hc,
        "cx": cx,
        "pitch": rng.uniform(-0.15, 0.0),
        "fov": rng.uniform(60, 75),
        "floor": floor,
        "floor_c": (_muted(rng, 90, 200), _muted(rng, 60, 170)),
        "tile": rng.uniform(0.4, 1.0),
        "wall": wall,
        "boxes": boxes,
        "decos": decos,
        "outdoor": scene == "college_outdoor",
        "noise_seed": int(rng.integers(2**31)),
    }


def _muted(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    g = rng.uniform(lo, hi)
    return g + 0.45 * (rng.uniform(lo, hi, 3) - g)  # scenes stay less saturated than the people in them


def _hash(k: np.ndarray) -> np.ndarray:
    return np.modf(np.abs(np.sin(k * 12.9898 + 78.233) * 43758.5453))[0]


def _render_scene(p: dict, width: int, height: int, rgb: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Return (rgb uint8 HxWx3 or None, z-distance float32 HxW). Same normalized view for any size."""
    t = math.tan(math.radians(p["fov"] / 2))
    u = ((np.arange(width) + 0.5) / width * 2 - 1) * t
    v = (1 - (np.arange(height) + 0.5) / height * 2) * t + p["pitch"]
    dx = np.broadcast_to(u[None, :], (height, width))
    dy = np.broadcast_to(v[:, None], (height, width))
    inf = np.float64(1e9)
    hc, H, W, D, cx = p["hc"], p["H"], p["W"], p["D"], p["cx"]
    with np.errstate(divide="ignore", invalid="ignore"):
        cand = np.stack(
            [
                np.where(dy < -1e-9, -hc / dy, inf),  # 0 floor
                np.where(dy > 1e-9, (H - hc) / dy, inf),  # 1 ceiling
                np.where(dx < -1e-9, (-W / 2 - cx) / dx, inf),  # 2 left wall
                np.where(dx > 1e-9, (W / 2 - cx) / dx, inf),  # 3 right wall
                np.full((height, width), D),  # 4 back wall
            ]
        )
    surf = cand.argmin(0)
    z = cand.min(0)
    face = np.zeros_like(surf)
    for k, (x0, x1, y0, y1, z0, z1, _) in enumerate(p["boxes"]):
        with np.errstate(divide="ignore", invalid="ignore"):
            tx0, tx1 = x0 / dx, x1 / dx
            ty0, ty1 = y0 / dy, y1 / dy
        lo = np.stack([np.minimum(tx0, tx1), np.minimum(ty0, ty1), np.full_like(z, z0)])
        hi = np.minimum(np.minimum(np.maximum(tx0, tx1), np.maximum(ty0, ty1)), z1)
        tnear = np.nan_to_num(lo.max(0), nan=-1.0)
        hit = (tnear <= hi) & (tnear > 0) & (tnear < z)
        z = np.where(hit, tnear, z)
        surf = np.where(hit, 5 + k, surf)
        face = np.where(hit, np.nan_to_num(lo, nan=-1.0).argmax(0), face)
    X, Y = z * dx, z * dy + hc  # Y = height above the floor
    sky = np.zeros(z.shape, bool)
    if p["outdoor"]:
        sky = (surf == 1) | ((surf >= 2) & (surf <= 4) & (Y > H - 1.0))
        z = np.where(sky, FAR, z)
    dist = z.astype(np.float32)
    if not rgb:
        return None, dist

    img = np.zeros((height, width, 3))
    c1, c2 = p["floor_c"]
    fl = surf == 0
    Zf = z
    if p["floor"] in ("tiles", "marble"):
        ts = p["tile"]
        chk = (np.floor(X / ts) + np.floor(Zf / ts)) % 2
        fcol = np.where(chk[..., None] > 0, c1, c2)
        if p["floor"] == "marble":
            fcol = fcol * (0.85 + 0.15 * np.sin(X * 3 + Zf * 2)[..., None])
    elif p["floor"] == "wood":
        plank = np.floor(X / 0.25)
        fcol = np.array([150, 100, 60]) * (0.7 + 0.5 * _hash(plank))[..., None]
        fcol = fcol * (0.9 + 0.1 * np.sin(Zf * 8 + plank)[..., None])
    elif p["floor"] == "grass":
        fcol = (
            np.where((np.abs(X) < 2.0)[..., None], np.array([150, 150, 145]), np.array([70, 120, 55]))
            * (0.85 + 0.3 * _hash(np.floor(X * 4) * 31 + np.floor(Zf * 4)))[..., None]
        )
    else:  # carpet
        fcol = c2[None, None, :] * (0.85 + 0.3 * _hash(np.floor(X * 20) * 17 + np.floor(Zf * 20)))[..., None]
    img[fl] = fcol[fl]
    ce = surf == 1
    panel = ((X % 2.0) < 0.6) & ((Zf % 3.0) < 0.8)
    img[ce] = np.where(panel[..., None], 245.0, 215.0)[ce]
    for s in (2, 3, 4):
        m = surf == s
        a = X if s == 4 else Zf
        col = np.broadcast_to(p["wall"], img.shape).copy()
        if p["outdoor"]:  # facades with a window grid
            win = ((a % 3.0) < 1.2) & ((Y % 3.2) < 1.4)
            col[win] = (70, 90, 110)
        else:
            col[Y < 0.9] *= 0.75  # wainscot band
        for a0, a1, b0, b1, rgbc in p["decos"][s]:
            inside = (a >= a0) & (a < a1) & (Y >= b0) & (Y < b1)
            col[inside] = rgbc
        img[m] = col[m]
    for k, box in enumerate(p["boxes"]):
        m = surf == 5 + k
        shade = np.array([0.8, 1.0, 0.65])[face]  # side, top, front
        img[m] = (box[6][None, None, :] * shade[..., None])[m]
    img[sky] = (np.array([120, 170, 230]) * (0.8 + 0.2 * np.clip(dy, 0, 1))[..., None])[sky]
    light = np.where(sky, 1.0, 0.5 + 0.5 * np.exp(-z / (0.7 * D)))
    img = img * light[..., None]
    nrng = np.random.default_rng(p["noise_seed"])
    img += nrng.normal(0, 3.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), dist


# ---------------------------------------------------------------------------------------------
# foregrounds: person-like sprites from primitives


@dataclass
class Sprite:
    rgb: np.ndarray  # h x w x 3 uint8
    mask: np.ndarray  # h x w bool
    mask_d: np.ndarray  # the mask resampled to depth-image scale
    relief_d: np.ndarray  # 0..1 bulge at depth scale (nearer where larger)


def _capsule(yy, xx, p0, p1, r):
    (y0, x0), (y1, x1) = p0, p1
    vy, vx = y1 - y0, x1 - x0
    tt = np.clip(((yy - y0) * vy + (xx - x0) * vx) / max(vy * vy + vx * vx, 1e-9), 0, 1)
    d = np.hypot(yy - (y0 + tt * vy), xx - (x0 + tt * vx))
    return d < r, np.clip(1 - d / r, 0, 1)


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255


def _render_person(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h = int(rng.integers(110, 185))
    w = int(h * 0.55)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy / h, (xx - w / 2) / h  # units of body height, x centred
    skin = np.array([(240, 200, 170), (200, 150, 110), (150, 100, 70), (90, 60, 40)][rng.integers(4)], float)
    shirt = _hsv(rng.uniform(), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    pants = _hsv(rng.uniform(), rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.55))
    hair = _hsv(rng.uniform(0.0, 0.12), rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.4))
    rgb = np.zeros((h, w, 3))
    relief = np.zeros((h, w))
    mask = np.zeros((h, w), bool)

    def paint(m, col, rel):
        nonlocal rgb, relief, mask
        rgb[m] = (col[None, :] * (0.6 + 0.4 * rel[m])[:, None]) if col.ndim == 1 else col[m]
        relief[m] = np.maximum(relief[m], rel[m])
        mask |= m

    sw = rng.uniform(0.11, 0.15)  # shoulder half-width
    lw = rng.uniform(0.035, 0.05)  # limb radius
    # legs, then torso, arms, head (later paints occlude earlier ones)
    for side in (-1, 1):
        foot = (rng.uniform(0.93, 0.98), side * rng.uniform(0.04, 0.12))
        m, r = _capsule(yy, xx, (0.52, side * 0.06), foot, lw * 1.15)
        paint(m, pants, r)
    torso = ((xx / (sw * 1.05)) ** 2 + ((yy - 0.36) / 0.2) ** 2) < 1
    trel = np.sqrt(np.clip(1 - (xx / (sw * 1.05)) ** 2, 0, 1))
    striped = rng.uniform() < 0.4
    tcol = shirt[None, None, :] * (0.6 + 0.4 * trel)[..., None]
    if striped:
        tcol = np.where(((yy * 40).astype(int) % 2 == 0)[..., None], tcol, tcol * 0.55)
    rgb[torso] = tcol[torso]
    relief[torso] = trel[torso]
    mask |= torso
    for side in (-1, 1):
        ang = rng.uniform(-0.3, 1.2)  # 0 = hanging down, >0 = raised outwards
        hand = (0.22 + 0.32 * math.cos(ang), side * (sw + 0.32 * math.sin(ang) * 0.6 + 0.02))
        hand = (hand[0], float(np.clip(hand[1], -0.26, 0.26)))
        m, r = _capsule(yy, xx, (0.22, side * sw), hand, lw)
        paint(m, shirt, r)
        m, r = _capsule(yy, xx, hand, hand, lw * 1.3)
        paint(m, skin, r)
    m, r = _capsule(yy, xx, (0.13, 0), (0.2, 0), 0.035)
    paint(m, skin, r)
    head = ((xx / 0.065) ** 2 + ((yy - 0.085) / 0.08) ** 2) < 1
    hrel = np.sqrt(np.clip(1 - (xx / 0.065) ** 2 - ((yy - 0.085) / 0.08) ** 2, 0, 1))
    paint(head, skin, hrel)
    hair_m = head & (yy < 0.06)
    rgb[hair_m] = hair
    rgb[mask] += rng.normal(0, 4.0, (int(mask.sum()), 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), mask, relief


def _to_depth_scale(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    hd, wd = max(1, round(h * DEPTH_H / IMG)), max(1, round(w * DEPTH_W / IMG))
    rows = np.minimum(((np.arange(hd) + 0.5) * h / hd).astype(int), h - 1)
    cols = np.minimum(((np.arange(wd) + 0.5) * w / wd).astype(int), w - 1)
    return a[rows][:, cols]


def _sprite(rgb, mask, relief) -> Sprite:
    return Sprite(rgb, mask, _to_depth_scale(mask), _to_depth_scale(relief).astype(np.float32))


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
    rgb, _ = _render_scene(p, IMG, IMG, rgb=True)
    _, dist = _render_scene(p, DEPTH_W, DEPTH_H, rgb=False)
    return rgb, dist


def build_assets(bgs: int, fgs: int, seed: int, workers: int = 1) -> Assets:
    """Render every bg (+ depth) and every fg sprite (+ flip) once; deterministic for a seed."""
    rng = np.random.default_rng([seed, 1])
    params = [_scene_params(rng, SCENES[b % len(SCENES)]) for b in range(bgs)]
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
        rgb, mask, relief = _render_person(frng)
        sprites.append(_sprite(rgb, mask, relief))
        sprites.append(_sprite(rgb[:, ::-1].copy(), mask[:, ::-1].copy(), relief[:, ::-1].copy()))
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
