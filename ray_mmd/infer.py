"""Inference from a trained model: load it (run dir, checkpoint dir or exported file), evaluate it over a
split/chunk of a packed dataset (overall and per scene class), and predict one fg_bg/bg pair at any size.

A loaded model always takes N x 6 x S x S floats in [0, 1] (fg_bg RGB then bg RGB, at the stage size S)
and normalises them itself with the statistics of the data it was *trained* on, stored in the
checkpoint (see train/loop.py's save), never with the statistics of the data being read.
Batch prediction on Ray Data lives in infer_batch.py, the plain-torch export in export.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_mmd import storage
from ray_mmd.errors import UserError

log = logging.getLogger("ray_mmd.infer")

EXPORT_META = "ray_mmd.json"  # the exported file's extra file: model, width, stage size, stats
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OUTPUT_SUFFIXES = ("mask.png", "mask_prob.png", "depth.png", "depth_color.png")  # depth_color is last


class Normalized(nn.Module):
    """model((x - mean) / std): x is N x 6 x S x S in [0, 1]; returns the raw N x 2 x S x S output
    (channel 0 mask logits, channel 1 depth logits; sigmoid gives probability / depth in [0, 1])."""

    def __init__(self, model: nn.Module, stats: dict[str, dict[str, list[float]]]) -> None:
        super().__init__()
        self.model = model
        bg = stats.get("bg", stats["fg_bg"])
        mean = torch.tensor([*stats["fg_bg"]["mean"], *bg["mean"]], dtype=torch.float32)
        std = torch.tensor([*stats["fg_bg"]["std"], *bg["std"]], dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, 6, 1, 1))
        self.register_buffer("std", std.view(1, 6, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


@dataclass
class Loaded:
    """A model ready for inference and what it was trained with."""

    net: nn.Module  # Normalized(model) or an exported program's module: [0,1] input, raw output
    name: str
    width: int
    size: int
    stats: dict[str, dict[str, list[float]]]
    source: str  # the checkpoint dir or exported file actually read
    stats_from: str = "checkpoint"
    meta: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: N x 6 x S x S in [0, 1] -> (mask logits, depth in [0, 1]), both N x 1 x S x S float32."""
        from ray_mmd.models import split_heads

        return split_heads(self.net(x.to(self.device)).float())


# ---- loading ------------------------------------------------------------------------------------


def _is_file(url: str) -> bool:
    fs, path = storage.filesystem(url)
    try:
        return fs.isfile(path)
    except Exception as e:
        raise UserError(f"cannot reach {url!r} ({type(e).__name__}: {e}); check the URL") from None


def _stats_from_manifest(state: dict[str, Any], url: str) -> dict[str, dict[str, list[float]]]:
    """Old checkpoints (before the inference meta): the training data's manifest, named by the saved config."""
    from ray_mmd.data import manifest as mf

    data = ((state.get("config") or {}).get("value") or {}).get("data", {}).get("url")
    if not data:
        raise UserError(
            f"{url} stores no normalisation and no training data URL: re-save it with this version"
        )
    try:
        stats = mf.load(data).stats
    except UserError as e:
        raise UserError(
            f"{url} predates stored normalisation and its training data {data!r} is unreadable ({e})"
        ) from None
    log.warning(
        "%s predates stored normalisation: using the stats of its training data's manifest %s", url, data
    )
    return stats


def _from_checkpoint(url: str, device: torch.device) -> Loaded:
    from ray_mmd.models import build_model
    from ray_mmd.train import checkpoint as st

    name = url.rstrip("/").rsplit("/", 1)[-1]
    try:
        if st.CKPT_RE.match(name):
            state, meta = st.load_checkpoint(url)
        else:
            state, meta, url = st.final_checkpoint(url)
    except st.CheckpointError as e:
        raise UserError(
            f"{url} is not a usable checkpoint ({e}): point --checkpoint at another one"
        ) from None
    inf = meta.get("inference")
    stats_from = "checkpoint"
    if inf is None:  # written before checkpoints carried it: the saved config + its data's manifest
        cfg = state["config"]["value"]
        inf = {
            "model": cfg["model"]["name"],
            "width": cfg["model"]["width"],
            "image_size": cfg["data"]["image_size"],
            "stats": _stats_from_manifest(state, url),
        }
        stats_from = f"manifest of {cfg['data']['url']} (checkpoint has no stored stats)"
    model = build_model(inf["model"], width=inf["width"])
    model.load_state_dict(state["model"])
    net = Normalized(model, inf["stats"]).to(device).eval()
    return Loaded(
        net, inf["model"], inf["width"], inf["image_size"], inf["stats"], url, stats_from, meta, device
    )


def _from_export(url: str, device: torch.device) -> Loaded:
    extra = {EXPORT_META: ""}
    data = storage.read_bytes(url)
    try:
        if data[:4] != b"PK\x03\x04":  # a .pt2 is a zip archive; anything else is not ours
            raise ValueError("not a zip archive")
        ep = torch.export.load(io.BytesIO(data), extra_files=extra)
        meta = json.loads(extra[EXPORT_META])
    except Exception as e:
        raise UserError(
            f"{url} is not a checkpoint or a model exported by `ray-mmd export` ({type(e).__name__}): "
            "point --checkpoint at a run dir, a checkpoint dir or an exported .pt2 file"
        ) from None
    net = ep.module().to(device)
    return Loaded(
        net, meta["model"], meta["width"], meta["image_size"], meta["stats"], url, "export", meta, device
    )


def load_model(
    url: str, model: str | None = None, width: int | None = None, device: str | torch.device = "cpu"
) -> Loaded:
    """A run dir (its newest verified checkpoint), a checkpoint dir, or an exported file.

    `model` / `width`: what the caller expects; a checkpoint of another model or width is an error.
    """
    storage.require(url, "checkpoint")
    device = torch.device(device)
    loaded = _from_export(url, device) if _is_file(url) else None
    if loaded is None:
        from ray_mmd.train import checkpoint as st

        if not st.CKPT_RE.match(url.rstrip("/").rsplit("/", 1)[-1]) and not st.list_checkpoints(url):
            raise UserError(
                f"{url} is not a checkpoint: point --checkpoint at a run dir, a checkpoint_* dir or an "
                "exported .pt2 file"
            )
        loaded = _from_checkpoint(url, device)
    if (model and model != loaded.name) or (width and width != loaded.width):
        raise UserError(
            f"{loaded.source} holds model {loaded.name} at width {loaded.width}, not "
            f"{model or loaded.name} at width {width or loaded.width} as asked: fix --model/--width or the checkpoint"
        )
    log.info("loaded %s (%s width %d, stage size %d)", loaded.source, loaded.name, loaded.width, loaded.size)
    return loaded


# ---- images -------------------------------------------------------------------------------------


def decode_rgb(data: bytes, size: int, what: str) -> tuple[np.ndarray, tuple[int, int]]:
    """(image decoded near `size` as H x W x 3 uint8, original (width, height)); one-line error if not an image."""
    from PIL import Image

    from ray_mmd.data.transforms import decode_image

    try:
        original = Image.open(io.BytesIO(data)).size
        return decode_image(data, size, gray=False), original
    except Exception as e:
        raise UserError(f"{what} is not an image ({type(e).__name__}): give a JPEG or PNG file") from None


def inputs_at_stage_size(fgs: list[np.ndarray], bgs: list[np.ndarray], size: int) -> torch.Tensor:
    """fg_bg / bg uint8 images (any sizes) -> N x 6 x S x S float in [0, 1], resized like training."""
    from ray_mmd.data.transforms import resize_u8

    return torch.cat([resize_u8(fgs, size), resize_u8(bgs, size)], 1).float().div_(255.0)


def to_input_size(t: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """1 x H' x W' map in [0, 1] -> H x W float32 numpy at the input's size (bilinear)."""
    if tuple(t.shape[-2:]) != tuple(hw):
        t = F.interpolate(t[None].float(), size=hw, mode="bilinear", align_corners=False)[0]
    return t[0].clamp(0, 1).cpu().numpy()


def prediction_pngs(mask_prob: np.ndarray, depth: np.ndarray) -> dict[str, bytes]:
    """The four output PNGs of one prediction, keyed by OUTPUT_SUFFIXES, in writing order."""
    from ray_mmd.viz import colorize_depth, png_bytes

    u8 = lambda a: (a * 255.0).round().astype(np.uint8)  # noqa: E731
    return {
        "mask.png": png_bytes(np.where(mask_prob >= 0.5, 255, 0).astype(np.uint8)),
        "mask_prob.png": png_bytes(u8(mask_prob)),
        "depth.png": png_bytes(u8(depth)),  # brighter = nearer, like the dataset's depth maps
        "depth_color.png": png_bytes(colorize_depth(depth)),
    }


def write_outputs(out: str, stem: str, pngs: dict[str, bytes]) -> list[str]:
    """Write each PNG atomically as OUT/STEM_<suffix>; the last (depth_color) marks the set complete."""
    urls = []
    for suffix in OUTPUT_SUFFIXES:
        url = storage.join(out, f"{stem}_{suffix}")
        storage.write_bytes_atomic(url, pngs[suffix])
        urls.append(url)
    return urls


def check_writable(out: str) -> None:
    """Fail now, with one line, when the output location cannot be written."""
    probe = storage.join(out, f".ray_mmd_write_probe-{os.getpid()}")
    try:
        storage.write_bytes_atomic(probe, b"")
        storage.remove(probe)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot write to {out!r} ({type(e).__name__}): choose another --out") from None


def predict_arrays(
    loaded: Loaded, fgs: list[np.ndarray], bgs: list[np.ndarray], sizes: list[tuple[int, int]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask probability, depth) per pair, each H x W at that pair's input size ((width, height) in sizes)."""
    mask_logits, depth = loaded(inputs_at_stage_size(fgs, bgs, loaded.size))
    prob = torch.sigmoid(mask_logits)
    return [
        (to_input_size(prob[i], (h, w)), to_input_size(depth[i], (h, w))) for i, (w, h) in enumerate(sizes)
    ]


def predict_pair(loaded: Loaded, fg_bg: str, bg: str, out: str) -> list[str]:
    """`ray-mmd predict --fg-bg IMG --bg IMG --out DIR`: four PNGs at the input's size; their URLs."""
    storage.require(fg_bg, "fg_bg image")
    storage.require(bg, "bg image")
    fg_img, fg_size = decode_rgb(storage.read_bytes(fg_bg), loaded.size, fg_bg)
    bg_img, bg_size = decode_rgb(storage.read_bytes(bg), loaded.size, bg)
    if fg_size != bg_size:
        raise UserError(
            f"fg_bg {fg_bg} is {fg_size[0]}x{fg_size[1]} but bg {bg} is {bg_size[0]}x{bg_size[1]}: "
            "give the scene with and without the object at the same size"
        )
    check_writable(out)
    ((mask_prob, depth),) = predict_arrays(loaded, [fg_img], [bg_img], [fg_size])
    stem = os.path.splitext(fg_bg.rstrip("/").rsplit("/", 1)[-1])[0]
    return write_outputs(out, stem, prediction_pngs(mask_prob, depth))


# ---- eval over a packed dataset -------------------------------------------------------------------


def parse_chunk(text: str | None) -> tuple[int, int] | None:
    """ "A:B" -> (A, B), a sample-id range; one-line error otherwise."""
    if not text:
        return None
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"--chunk {text!r} is not A:B (a sample-id range such as 0:80000)") from None
    if not 0 <= lo < hi:
        raise UserError(f"--chunk {text!r}: need 0 <= A < B")
    return lo, hi


def bg_table(man: Any, size: int) -> tuple[torch.Tensor, dict[int, str], dict[int, bytes]]:
    """bg images of a packed dataset: (B x 3 x S x S uint8 by bg_id, decoded as training does; bg_type by id;
    encoded bytes by id)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_mmd.data.transforms import decode_image, resize_u8

    t = pq.read_table(pa.BufferReader(storage.read_bytes(man.url(man.bg.path))))
    ids = t.column("bg_id").to_pylist()
    blobs = dict(zip(ids, t.column("image").to_pylist(), strict=True))
    arrs = [np.zeros((size, size, 3), np.uint8)] * (max(ids, default=0) + 1)
    for b, d in blobs.items():
        arrs[b] = decode_image(d, size, gray=False)
    types = dict(zip(ids, t.column("bg_type").to_pylist(), strict=True))
    return resize_u8(arrs, size), types, blobs


def _decode_at(fg_bg: list[bytes], mask: list[bytes], depth: list[bytes], size: int):
    """n samples decoded as training decodes them (DCT-scaled, then resized) to S x S uint8:
    (fg n x 3 x S x S, mask n x S x S, depth n x S x S, ok bool[n], reason per sample)."""
    from ray_mmd.data.transforms import decode_into

    n = len(fg_bg)
    bufs = [
        np.empty((n, size, size, 3), np.uint8),
        np.empty((n, size, size), np.uint8),
        np.empty((n, size, size), np.uint8),
    ]
    why = [""] * n
    for name, blobs, dst in zip(("fg_bg", "mask", "depth"), (fg_bg, mask, depth), bufs, strict=True):
        for i, r in enumerate(decode_into(blobs, dst, name != "fg_bg", size)):
            why[i] = why[i] or (f"{name}: {r}" if r else "")
    ok = np.array([not r for r in why], dtype=bool)
    fg, m, d = (torch.from_numpy(b) for b in bufs)
    return fg.permute(0, 3, 1, 2), m, d, ok, why


def packed_batches(man: Any, ids: np.ndarray, size: int, batch_size: int):
    """Batches of (sample_id int64[n], fg n x 3 x S x S u8, mask n x S x S u8, depth n x S x S u8, bg_id[n])
    for the given ids, shard by shard; samples that fail to decode are skipped and logged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not len(ids):
        return
    cols = ["sample_id", "fg_bg", "mask", "depth", "bg_id"]
    for shard in man.shards_overlapping(int(ids[0]), int(ids[-1]) + 1):
        t = pq.read_table(pa.BufferReader(storage.read_bytes(man.url(shard.path))), columns=cols)
        sid = t.column("sample_id").to_numpy()
        rows = np.flatnonzero(np.isin(sid, ids))
        for i in range(0, len(rows), batch_size):
            sel = t.take(pa.array(rows[i : i + batch_size]))
            fg, mask, depth, ok, why = _decode_at(
                *(sel.column(k).to_pylist() for k in ("fg_bg", "mask", "depth")), size
            )
            s_ids, bg_id = sel.column("sample_id").to_numpy(), sel.column("bg_id").to_numpy()
            for j in np.flatnonzero(~ok):
                log.warning("sample %d skipped: %s", s_ids[j], why[j])
            keep = torch.from_numpy(ok)
            if keep.any():
                yield s_ids[ok], fg[keep], mask[keep], depth[keep], bg_id[ok]


def sample_iou(mask_logits: torch.Tensor, mask_gt: torch.Tensor) -> torch.Tensor:
    """Per-image IoU exactly as metrics.py defines it (1 when both are empty)."""
    p, g = (mask_logits >= 0).flatten(1), (mask_gt >= 0.5).flatten(1)
    inter, union = (p & g).sum(1).double(), (p | g).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


class _Extremes:
    """The k best and k worst samples by IoU seen so far (copies of their tensors, for the grid)."""

    def __init__(self, k: int) -> None:
        self.k, self.best, self.worst = k, [], []

    def add(self, iou: torch.Tensor, ids: np.ndarray, *tensors: torch.Tensor) -> None:
        items = [
            (float(v), int(i), [t[j].detach().cpu().clone() for t in tensors])
            for j, (v, i) in enumerate(zip(iou, ids, strict=True))
        ]
        self.best = sorted(self.best + items, key=lambda r: (-r[0], r[1]))[: self.k]
        self.worst = sorted(self.worst + items, key=lambda r: (r[0], r[1]))[: self.k]


def evaluate(
    loaded: Loaded,
    data: str,
    split: str = "test",
    chunk: tuple[int, int] | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    grid_rows: int = 4,
) -> tuple[dict[str, Any], bytes | None]:
    """Metrics overall and per bg_type on `split` (within `chunk`), and a PNG grid of best/worst by IoU."""
    from ray_mmd.data import manifest as mf
    from ray_mmd.metrics import MetricAccumulator
    from ray_mmd.viz import best_worst_grid

    man = mf.load(data)
    lo, hi = chunk or (0, man.id_end)
    ids = man.sample_ids(split, lo, hi)
    if max_samples is not None:
        ids = ids[:max_samples]
    if not len(ids):
        raise UserError(
            f"no {split} samples in {data} within ids [{lo}, {hi}): pick another --split or --chunk"
        )
    bg_u8, bg_type, _ = bg_table(man, loaded.size)
    overall = MetricAccumulator(loaded.device)
    per_type: dict[str, MetricAccumulator] = {}
    extremes = _Extremes(grid_rows)
    for s_ids, fg, mask, depth, bg_id in packed_batches(man, ids, loaded.size, batch_size):
        x = torch.cat([fg, bg_u8[torch.from_numpy(bg_id).long()]], 1).float().div_(255.0)
        mask_t, depth_t = (t.unsqueeze(1).float().div_(255.0).to(loaded.device) for t in (mask, depth))
        logits, depth_p = loaded(x)
        overall.update(logits, mask_t, depth_p, depth_t)
        types = np.array([bg_type[int(b)] for b in bg_id])
        for t in np.unique(types):
            j = torch.from_numpy(np.flatnonzero(types == t)).to(loaded.device)
            acc = per_type.setdefault(str(t), MetricAccumulator(loaded.device))
            acc.update(logits[j], mask_t[j], depth_p[j], depth_t[j])
        extremes.add(sample_iou(logits, mask_t), s_ids, x, mask_t, logits, depth_t, depth_p)
    grid = None
    if extremes.best:
        grid = best_worst_grid(
            [r[2] for r in extremes.best],
            [r[2] for r in extremes.worst],
            [(r[1], r[0]) for r in extremes.best],
            [(r[1], r[0]) for r in extremes.worst],
        )
    result = {
        "checkpoint": loaded.source,
        "stats_from": loaded.stats_from,
        "data": data,
        "split": split,
        "chunk": [lo, hi],
        "overall": overall.compute(),
        "per_bg_type": {t: a.compute() for t, a in sorted(per_type.items())},
        "best": [{"sample_id": r[1], "iou": r[0]} for r in extremes.best],
        "worst": [{"sample_id": r[1], "iou": r[0]} for r in extremes.worst],
    }
    return result, grid


def format_eval(result: dict[str, Any]) -> str:
    """The eval result as a table: one row overall, one per scene class."""
    cols = ("iou", "dice", "abs_rel", "rmse", "delta1", "delta2", "delta3")
    head = f"{'scene':<18}{'images':>8}" + "".join(f"{c:>9}" for c in cols)
    rows = [("overall", result["overall"]), *result["per_bg_type"].items()]
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(f"{name:<18}{int(m['images']):>8}" + "".join(f"{m[c]:>9.4f}" for c in cols))
    return "\n".join(lines)
