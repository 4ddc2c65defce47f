"""Decode at reduced DCT scale, resize, normalisation with manifest stats, joint flips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import simplejpeg
import torch

from ray_mmd.data import manifest as mf
from ray_mmd.data.stream import Chunk, DataStream, StreamConfig
from ray_mmd.data.transforms import Normalizer, decode_image, decode_samples, flip_decisions, resize_u8


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> str:
    from ray_mmd.data.pack import make_synthetic

    root = str(tmp_path_factory.mktemp("packed") / "ds")
    make_synthetic(root, 60, 30, seed=2, test_fraction=0.1)
    return root


def _jpeg(h: int, w: int, gray: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (h, w, 1 if gray else 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(a, colorspace="GRAY" if gray else "RGB")


@pytest.mark.parametrize("lib", ["pil", "simplejpeg"])
def test_decode_uses_dct_scaling(lib):
    assert decode_image(_jpeg(250, 250), 56, False, lib).shape == (63, 63, 3)  # 1/4 scale, not 250
    assert decode_image(_jpeg(240, 320, True), 56, True, lib).shape == (60, 80, 1)
    assert decode_image(_jpeg(250, 250), 224, False, lib).shape == (250, 250, 3)


def test_decode_samples_quarantines_corrupt():
    good = _jpeg(250, 250)
    gm = _jpeg(250, 250, True)
    fg, m, d, ok, reasons = decode_samples([good, b"junk", good[:100]], [gm] * 3, [gm, gm, b""], 56)
    assert fg.shape == (3, 3, 56, 56) and m.shape == (3, 56, 56) and d.dtype == torch.uint8
    assert ok.tolist() == [True, False, False] and reasons[1]


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


def test_normalisation_matches_manifest_stats(packed):
    man = mf.load(packed)
    norm = Normalizer(man.stats)
    fg = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    bg = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    m = torch.randint(0, 256, (2, 8, 8), dtype=torch.uint8)
    out = norm(fg, bg, m, m)
    mean = torch.tensor(man.stats["bg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(man.stats["bg"]["std"]).view(1, 3, 1, 1)
    assert torch.allclose(out["x"][:, 3:] * std + mean, bg.float() / 255, atol=1e-5)
    assert torch.allclose(out["mask"][:, 0], m.float() / 255)
    # over a real epoch the normalised fg_bg is roughly zero-mean, unit-std
    s = DataStream(StreamConfig(data=packed, image_size=56, global_batch_size=16, flip_p=0.0, workers=2))
    x = torch.cat([b["x"] for b in s.epoch_batches()])
    assert x[:, :3].mean().abs() < 0.3 and 0.6 < x[:, :3].std() < 1.4


def test_joint_flip_keeps_targets_aligned(packed):
    cfg = StreamConfig(
        data=packed, image_size=56, global_batch_size=16, shuffle=False, workers=2, chunks=[Chunk(0, 60, 1)]
    )
    plain = list(DataStream(dataclasses.replace(cfg, flip_p=0.0)).epoch_batches())
    flipped = list(DataStream(dataclasses.replace(cfg, flip_p=1.0)).epoch_batches())
    for a, b in zip(plain, flipped, strict=True):
        assert torch.equal(a["sample_id"], b["sample_id"])
        for k in ("x", "mask", "depth"):
            assert torch.equal(b[k], a[k].flip(-1)), k
        # the flipped mask still covers the flipped foreground (where fg_bg differs from bg)
        diff = (b["x"][:, :3] - b["x"][:, 3:]).abs().mean(1, keepdim=True) > 0.5
        fg_cover = b["mask"][diff].mean()
        bg_cover = b["mask"][~diff].mean()
        assert fg_cover > bg_cover + 0.3
