"""Decode at reduced DCT scale into batch buffers, resize, the device-side finisher (normalisation with
manifest stats, joint flips)."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg
import torch

from ray_mmd.data import manifest as mf
from ray_mmd.data.order import Chunk
from ray_mmd.data.stream import DataStream
from ray_mmd.data.transforms import (
    BatchFinisher,
    alloc_wire,
    decode_image,
    decode_into,
    flip_decisions,
    make_finisher,
    resize_u8,
    wire_shapes,
)


@pytest.fixture(scope="module")
def packed(packed_factory) -> str:
    return packed_factory(60, 30, seed=2)


def _jpeg(h: int, w: int, gray: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (h, w, 1 if gray else 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(a, colorspace="GRAY" if gray else "RGB")


@pytest.mark.parametrize("lib", ["pil", "simplejpeg"])
def test_decode_uses_dct_scaling(lib):
    assert decode_image(_jpeg(250, 250), 56, False, lib).shape == (63, 63, 3)  # 1/4 scale, not 250
    assert decode_image(_jpeg(240, 320, True), 56, True, lib).shape == (60, 80, 1)
    assert decode_image(_jpeg(250, 250), 224, False, lib).shape == (250, 250, 3)


def test_wire_shapes_follow_the_decoder():
    sizes = {"fg_bg": [250, 250], "mask": [250, 250], "depth": [320, 240]}  # [w, h] as in the manifest
    assert wire_shapes(sizes, 56, False) == {"fg_bg": (63, 63), "mask": (63, 63), "depth": (60, 80)}
    assert wire_shapes(sizes, 224, False)["depth"] == (240, 320)
    assert wire_shapes(sizes, 56, True)["depth"] == (56, 56)  # decoded preload: host resizes


def test_decode_into_writes_rows_in_place_and_resizes_odd_sizes():
    blobs = [_jpeg(250, 250), _jpeg(300, 200), b"junk", _jpeg(250, 250)]
    buf = alloc_wire(4, {"fg_bg": (63, 63), "mask": (63, 63), "depth": (60, 80)})["fg_bg"].numpy()
    reasons = decode_into(blobs, buf, False, 56)
    assert [bool(r) for r in reasons] == [False, False, True, False]
    assert np.array_equal(buf[0], decode_image(blobs[0], 56, False))  # decoded straight into its row
    assert buf[1].shape == (63, 63, 3) and buf[1].std() > 10  # a 300x200 source, resized into the row
    assert not buf[2].any()  # failed rows are zeroed


def test_decode_into_reports_every_corrupt_row():
    good = _jpeg(250, 250)
    fg = np.full((3, 63, 63, 3), 7, np.uint8)
    reasons = decode_into([good, b"junk", good[:100]], fg, False, 56)
    assert [bool(r) for r in reasons] == [False, True, True] and fg[0].std() > 0 and not fg[1:].any()
    gray = np.full((2, 63, 63), 7, np.uint8)
    assert [bool(r) for r in decode_into([_jpeg(250, 250, True), b""], gray, True, 56)] == [False, True]


def test_resize_mixed_shapes():
    imgs = [np.full((63, 63, 1), 200, np.uint8), np.full((60, 80, 1), 100, np.uint8)]
    out = resize_u8(imgs, 56)
    assert out.shape == (2, 1, 56, 56)
    assert int(out[0].min()) == int(out[0].max()) == 200 and int(out[1].max()) == 100


def test_flip_decisions_pure_and_fair():
    ids = np.arange(20000)
    a = flip_decisions(ids, 0.5, 1, 0, 0)
    assert np.array_equal(a[::-1], flip_decisions(ids[::-1], 0.5, 1, 0, 0))  # order-free
    assert 0.47 < a.mean() < 0.53
    assert not np.array_equal(a, flip_decisions(ids, 0.5, 1, 0, 1))  # new coin each epoch
    assert not flip_decisions(ids, 0.0, 1, 0, 0).any() and flip_decisions(ids, 1.0, 1, 0, 0).all()


def _wire(n: int, hw: tuple[int, int], n_bg: int, flip: list[bool] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fg_bg": torch.randint(0, 256, (n, *hw, 3), dtype=torch.uint8, generator=g),
        "mask": torch.randint(0, 256, (n, *hw), dtype=torch.uint8, generator=g),
        "depth": torch.randint(0, 256, (n, *hw), dtype=torch.uint8, generator=g),
        "bg_id": torch.randint(0, n_bg, (n,), generator=g),
        "flip": torch.tensor(flip or [False] * n),
        "sample_id": torch.arange(n),
    }


def test_finisher_normalises_with_manifest_stats(packed, stream_cfg):
    man = mf.load(packed)
    bg = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    fin = BatchFinisher(man.stats, bg, 8)
    w = _wire(4, (8, 8), 5)
    out = fin(w)
    assert out["x"].shape == (4, 6, 8, 8) and out["mask"].shape == (4, 1, 8, 8)
    for lo, key, img in ((0, "fg_bg", w["fg_bg"].permute(0, 3, 1, 2)), (3, "bg", bg[w["bg_id"]])):
        mean = torch.tensor(man.stats[key]["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(man.stats[key]["std"]).view(1, 3, 1, 1)
        assert torch.allclose(out["x"][:, lo : lo + 3] * std + mean, img.float() / 255, atol=1e-5), key
    assert torch.allclose(out["mask"][:, 0], w["mask"].float() / 255)
    # over a real epoch the normalised fg_bg is roughly zero-mean, unit-std
    s = DataStream(stream_cfg(packed, image_size=56, global_batch_size=16, flip_p=0.0, workers=2))
    x = torch.cat([b["x"] for b in s.model_batches()])
    assert x.shape[1:] == (6, 56, 56)
    assert x[:, :3].mean().abs() < 0.3 and 0.6 < x[:, :3].std() < 1.4


def test_finisher_gpu_path_matches_host_kernel(packed):
    """The float resize used on GPUs and the uint8 kernel used on CPUs agree to within rounding."""
    fin = make_finisher(mf.load(packed), 56)
    w = _wire(3, (63, 63), 1, flip=[True, False, True])
    host = fin(w)
    fin._resize = lambda t: torch.nn.functional.interpolate(  # what runs on a CUDA device
        t.float(), size=(56, 56), mode="bilinear", antialias=True, align_corners=False
    )
    dev = fin(w)
    for k in ("mask", "depth"):
        assert (host[k] - dev[k]).abs().max() <= 1 / 255 + 1e-6, k
    assert (host["x"][:, :3] - dev["x"][:, :3]).abs().max() < 0.05  # ~1/255 over std


def test_joint_flip_keeps_targets_aligned(packed, stream_cfg):
    cfg = stream_cfg(
        packed, image_size=56, global_batch_size=16, shuffle=False, workers=2, chunks=[Chunk(0, 60, 1)]
    )
    plain = list(DataStream(cfg.with_data(flip_p=0.0)).model_batches())
    flipped = list(DataStream(cfg.with_data(flip_p=1.0)).model_batches())
    for a, b in zip(plain, flipped, strict=True):
        assert torch.equal(a["sample_id"], b["sample_id"])
        for k in ("x", "mask", "depth"):
            assert torch.equal(b[k], a[k].flip(-1)), k
        # the flipped mask still covers the flipped foreground (where fg_bg differs from bg)
        diff = (b["x"][:, :3] - b["x"][:, 3:]).abs().mean(1, keepdim=True) > 0.5
        fg_cover = b["mask"][diff].mean()
        bg_cover = b["mask"][~diff].mean()
        assert fg_cover > bg_cover + 0.3
