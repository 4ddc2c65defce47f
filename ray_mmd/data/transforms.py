"""Sample transforms: JPEG decode at reduced DCT scale straight into batch buffers, and the batch finisher
(resize, joint flip, normalisation) that runs on the training device.

Split of work. The host does only what must happen on a CPU: JPEG decode, written straight into the
batch's uint8 buffer at the decoder's native (DCT-scaled) size. Everything per-pixel after that (resize
to the stage size, the joint flip, float conversion and normalisation, the bg lookup) is done on the
batch by `BatchFinisher` where the batch lands: on a GPU it costs microseconds and the host→device copy
is uint8 (~4x fewer bytes than float32 at 224).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ray_mmd import storage
from ray_mmd.data.manifest import Manifest

log = logging.getLogger(__name__)

# Decoders ("simplejpeg" | "pil"). simplejpeg's min_height/min_width and PIL's `draft` both use
# libjpeg-turbo's DCT scaling, so a 250x250 JPEG decodes straight to 63x63 for a 56 target. Both release
# the GIL while decoding; simplejpeg is ~1.7x faster per image and decodes into a caller's buffer.
KEYS = ("fg_bg", "mask", "depth")  # wire keys of the decoded sample images; fg_bg is RGB, the rest gray


def decode_image(data: bytes, min_size: int, gray: bool, lib: str = "simplejpeg") -> np.ndarray:
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


def decoded_shape(width: int, height: int, min_size: int) -> tuple[int, int]:
    """(H, W) the decoder gives for a width×height JPEG at `min_size`: the batch buffer's shape.

    Asks libjpeg-turbo itself (header of a blank JPEG of that size), so it matches its scale choice.
    """
    import simplejpeg

    blank = simplejpeg.encode_jpeg(np.zeros((height, width, 1), np.uint8), colorspace="GRAY")
    h, w, _, _ = simplejpeg.decode_jpeg_header(blank, min_height=min_size, min_width=min_size)
    return int(h), int(w)


def resize_u8(images: Sequence[np.ndarray], size: int | tuple[int, int]) -> torch.Tensor:
    """Stack H×W×C uint8 images into an n×C×h×w uint8 tensor (bilinear, antialiased); size = (h, w) or s.

    Images are grouped by shape so each group is one vectorised interpolate.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if not images:
        return torch.zeros((0, 1, h, w), dtype=torch.uint8)
    c = images[0].shape[2]
    out = torch.empty((len(images), c, h, w), dtype=torch.uint8)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(images):
        groups.setdefault(a.shape, []).append(i)
    for _, idx in groups.items():
        t = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2)
        out[idx] = resize_planes_u8(t, (h, w))
    return out


def resize_planes_u8(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """n×C×H×W uint8 -> n×C×h×w uint8, bilinear antialiased, on the CPU.

    torch's vectorised uint8 antialias kernel wants channels-last RGB and is ~7x faster than going
    through float. Any channel count rides three planes to a pixel (the kernel treats channels
    independently, so this is exact).
    """
    n, c, hh, ww = t.shape
    if (hh, ww) == tuple(size):
        return t
    planes = t.reshape(n * c, hh, ww)
    pad = (-len(planes)) % 3
    if pad:
        planes = torch.cat([planes, planes.new_zeros((pad, hh, ww))])
    trip = planes.reshape(-1, 3, hh, ww).contiguous(memory_format=torch.channels_last)
    r = F.interpolate(trip, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return r.reshape(-1, *size)[: n * c].reshape(n, c, *size)


def decode_into(
    blobs: Sequence[bytes], dst: np.ndarray, gray: bool, min_size: int, lib: str = "simplejpeg"
) -> list[str]:
    """Decode JPEGs into rows of dst (n×H×W for gray, n×H×W×3 for RGB); returns a reason per failed row.

    A JPEG whose DCT-scaled size is dst's is decoded in place (no copy); others are decoded and
    resized into their row. Failed rows are zeroed and their reason is non-empty.
    """
    import simplejpeg

    reasons = [""] * len(blobs)
    hw = dst.shape[1:3]
    other: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    cs = "GRAY" if gray else "RGB"
    for i, data in enumerate(blobs):
        try:
            if lib == "simplejpeg" and data[:2] == b"\xff\xd8":
                h, w, _, _ = simplejpeg.decode_jpeg_header(data, min_height=min_size, min_width=min_size)
                if (h, w) == hw:
                    simplejpeg.decode_jpeg(data, cs, min_height=min_size, min_width=min_size, buffer=dst[i])
                    continue
            a = decode_image(data, min_size, gray, lib)
            if a.shape[:2] == hw:
                dst[i] = a[:, :, 0] if gray else a
            else:
                other.setdefault(a.shape, []).append((i, a))
        except Exception as e:  # any corrupt image is reported, never fatal
            dst[i] = 0
            reasons[i] = f"{type(e).__name__}: {e}"[:200] or type(e).__name__
    for items in other.values():
        r = resize_u8([a for _, a in items], hw)  # n×C×h×w
        for (i, _), v in zip(items, r, strict=True):
            dst[i] = v[0].numpy() if gray else v.permute(1, 2, 0).numpy()
    return reasons


def wire_shapes(sizes: dict[str, list[int]], size: int, resize_on_host: bool) -> dict[str, tuple[int, int]]:
    """(H, W) of each decoded key in a batch: the DCT-scaled source size, or size×size when the host
    resizes (decoded preload keeps samples at the stage size)."""
    if resize_on_host:
        return {k: (size, size) for k in KEYS}
    return {k: decoded_shape(sizes[k][0], sizes[k][1], size) for k in KEYS}


def alloc_wire(
    n: int, shapes: dict[str, tuple[int, int]], pin: bool = False, shared: bool = False
) -> dict[str, torch.Tensor]:
    """Uninitialised uint8 batch buffers (fg_bg n×H×W×3, mask/depth n×H×W): pinned (for async copies
    to a GPU) or in shared memory (to hand to another process without a copy)."""
    out = {}
    for k in KEYS:
        shape = (n, *shapes[k], 3) if k == "fg_bg" else (n, *shapes[k])
        if shared:
            storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
            out[k] = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
        else:
            out[k] = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
    return out


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


class BatchFinisher:
    """Wire batch -> model tensors, on the device the batch is on (no host sync).

    Wire batch: ``fg_bg`` n×H×W×3, ``mask``/``depth`` n×h×w uint8 at decode size, ``bg_id`` n int64,
    ``flip`` n bool, ``sample_id``. Output: ``x`` n×6×S×S float normalised with the manifest's stats
    (fg_bg then bg), ``mask``/``depth`` n×1×S×S in [0,1], ``sample_id``. The flip mirrors all four
    images of a sample at once, so targets stay aligned.
    """

    def __init__(self, stats: dict[str, dict[str, list[float]]], bg: torch.Tensor, size: int) -> None:
        """bg: all bg images as B×3×S×S uint8 (resized once, so per batch it is only a gather)."""

        def mv(k: str) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.tensor(stats[k]["mean"]) * 255.0, torch.tensor(stats[k]["std"]) * 255.0)

        (fm, fs), (bm, bs) = mv("fg_bg"), mv("bg" if "bg" in stats else "fg_bg")
        mean, std = torch.cat([fm, bm]), torch.cat([fs, bs])
        # (u - mean) / std as one multiply-add
        self.size = size
        self._host = {"bg": bg, "scale": (1 / std).view(1, 6, 1, 1), "shift": (-mean / std).view(1, 6, 1, 1)}
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def to(self, device: torch.device | str) -> BatchFinisher:
        """Put the bg table and constants on `device` now (else on first use)."""
        self._consts(torch.device(device))
        return self

    def _consts(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._on:
            self._on[device] = {k: v.to(device) for k, v in self._host.items()}
        return self._on[device]

    def _resize(self, t: torch.Tensor) -> torch.Tensor:
        """n×C×H×W uint8 -> n×C×S×S in [0, 255]: still uint8 on the CPU (or when no resize is needed),
        float where the resize had to go through float (GPU)."""
        s = (self.size, self.size)
        if t.shape[-2:] == s:
            return t
        if t.device.type == "cpu":  # the fast uint8 kernel exists on CPU only
            return resize_planes_u8(t, s)
        return F.interpolate(t.float(), size=s, mode="bilinear", antialias=True, align_corners=False)

    @staticmethod
    def _flip_(t: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Mirror, in place, the samples of a freshly made n×C×S×S tensor whose flip is set."""
        # on the CPU index the flipped rows (~3x cheaper than where); on a GPU that would be a host sync
        if t.device.type == "cpu":
            i = flip.nonzero().view(-1)
            t[i] = t[i].flip(-1)
            return t
        return torch.where(flip.view(-1, 1, 1, 1), t.flip(-1), t)

    def __call__(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self._consts(b["fg_bg"].device)
        # on the CPU, gather and flip while the data is still uint8 (4x fewer bytes per pass than float:
        # the CPU finish at 224 is ~1.7x faster so; benchmarks/bench_finish.py)
        fg = self._resize(b["fg_bg"].permute(0, 3, 1, 2))
        x = torch.cat([fg, c["bg"].index_select(0, b["bg_id"]).to(fg.dtype)], 1)
        x = self._flip_(x, b["flip"]).float().mul_(c["scale"]).add_(c["shift"])
        out = {"x": x, "sample_id": b["sample_id"]}
        for k in ("mask", "depth"):
            t = self._resize(b[k].unsqueeze(1)).float()  # a new tensor, never the wire batch
            out[k] = self._flip_(t, b["flip"]).mul_(1 / 255.0)
        return out


# ---- the bg table (every bg image once, at the stage size) and the finisher that gathers from it --

_BG: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}
_BG_CAP = 4  # (dataset, size) pairs kept: a stage's training and eval share one


def bg_table(man: Manifest, size: int, lib: str = "simplejpeg") -> tuple[torch.Tensor, np.ndarray]:
    """All bg images decoded once and resized to size: (uint8 [max_id+1,3,S,S], bad bool[max_id+1]).

    Kept per process (bounded): the streams and the evaluation of one stage share it.
    """
    key = (man.root, man.bg.sha256, size)
    if key not in _BG:
        t = pq.read_table(pa.BufferReader(storage.read_bytes(man.url(man.bg.path))))
        bid = t.column("bg_id").to_numpy()
        imgs = t.column("image").to_pylist()
        n = int(bid.max()) + 1 if len(bid) else 1
        bad = np.ones(n, bool)
        arrs = [np.zeros((size, size, 3), np.uint8)] * n
        for b, data in zip(bid, imgs, strict=True):
            try:
                arrs[b] = decode_image(data, size, False, lib)
                bad[b] = False
            except Exception as e:
                log.warning("bg image %d does not decode (%s); its samples are quarantined", b, e)
        while len(_BG) >= _BG_CAP:
            _BG.pop(next(iter(_BG)))
        _BG[key] = (resize_u8(arrs, size), bad)
    return _BG[key]


def forget_bg_tables() -> None:
    """Drop this process's bg tables (benchmarks measuring a cold start)."""
    _BG.clear()


def make_finisher(man: Manifest, size: int, lib: str = "simplejpeg") -> BatchFinisher:
    """The BatchFinisher for this dataset at this stage size (holds the bg table)."""
    return BatchFinisher(man.stats, bg_table(man, size, lib)[0], size)
