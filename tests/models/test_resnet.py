"""The ResNet alternatives (blocks written here, no torchvision): counts, shapes, gradients."""

from __future__ import annotations

import pytest
import torch

from ray_mmd.models import build_model, count_parameters
from ray_mmd.models.resnet import Bottleneck, ResNetEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parameter_counts_at_full_width():
    assert count_parameters(build_model("resnet50")) == 24_046_850
    assert count_parameters(build_model("resnet18_unet")) == 16_019_362


def test_resnet50_body_matches_torchvision_layout():
    # torchvision's resnet50 has 25,557,032 parameters: minus fc (2048*1000 + 1000), plus a 6-channel stem
    body = ResNetEncoder(Bottleneck, [3, 4, 6, 3], 64, in_channels=3)
    assert count_parameters(body) == 25_557_032 - 2048 * 1000 - 1000


@pytest.mark.parametrize("name", ["resnet50", "resnet18_unet"])
@pytest.mark.parametrize("size", [64, 56, 75])
def test_shapes(name, size):
    with torch.no_grad():
        out = build_model(name, width=4).eval()(torch.randn(2, 6, size, size))
    assert out.shape == (2, 2, size, size)


@pytest.mark.parametrize("name", ["resnet50", "resnet18_unet"])
def test_gradients_reach_every_parameter(name):
    model = build_model(name, width=4)
    model(torch.randn(2, 6, 64, 64)).square().mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
