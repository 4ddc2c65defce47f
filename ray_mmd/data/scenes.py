"""Procedural content for the synthetic dataset: rooms in perspective ray-cast per pixel (colour and
exact distance) and person-like sprites built from primitives (colour, mask, relief). Pure numpy."""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

IMG = 250  # fg_bg, bg, mask: IMG x IMG
DEPTH_W, DEPTH_H = 320, 240
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


def scene_params(rng: np.random.Generator, scene: str) -> dict:
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


def render_scene(p: dict, width: int, height: int, rgb: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Return (rgb uint8 HxWx3 or None, z-distance float32 HxW). Same normalized view for any size."""
    g = _ray_cast(p, width, height)
    dist = g["z"].astype(np.float32)
    return (_paint(p, g) if rgb else None), dist


def _ray_cast(p: dict, width: int, height: int) -> dict[str, np.ndarray]:
    """Per pixel: the surface hit (0 floor, 1 ceiling, 2-4 walls, 5+k box k), its distance z, the box
    face, the hit point's X and height Y, the ray's dy and the sky mask."""
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
    return {"surf": surf, "z": z, "face": face, "X": X, "Y": Y, "dy": dy, "sky": sky}


def _floor(p: dict, X: np.ndarray, Zf: np.ndarray) -> np.ndarray:
    """Floor colour at floor points (X, Z)."""
    c1, c2 = p["floor_c"]
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
    return fcol


def _paint(p: dict, g: dict[str, np.ndarray]) -> np.ndarray:
    """RGB uint8 of a ray-cast scene: floor, ceiling panels, walls with decorations, shaded boxes,
    sky, distance fall-off and sensor noise."""
    surf, z, face, X, Y, dy, sky = (g[k] for k in ("surf", "z", "face", "X", "Y", "dy", "sky"))
    Zf, D = z, p["D"]
    img = np.zeros((*z.shape, 3))
    fl = surf == 0
    img[fl] = _floor(p, X, Zf)[fl]
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
    return np.clip(img, 0, 255).astype(np.uint8)


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


def render_person(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def sprite(rgb, mask, relief) -> Sprite:
    return Sprite(rgb, mask, _to_depth_scale(mask), _to_depth_scale(relief).astype(np.float32))
