"""The UNet spine and its 224 wrapper: exact parameter counts, shapes, freezing, the registry."""

from __future__ import annotations

import pytest
import torch

from ray_mmd.losses import MultiTaskLoss
from ray_mmd.models import (
    UNet,
    UNet224,
    build_model,
    count_parameters,
    freeze_spine,
    model_names,
    split_heads,
    unfreeze_all,
)
from ray_mmd.train.step import make_optimizer, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_exact_parameter_counts_at_full_width():
    assert count_parameters(build_model("unet")) == 17_269_186
    assert count_parameters(build_model("unet224")) == 17_532_622


@pytest.mark.parametrize("size", [56, 67, 32])
def test_spine_shapes(size):
    out = UNet(width=4).eval()(torch.randn(2, 6, size, size))
    assert out.shape == (2, 2, size, size)


@pytest.mark.parametrize("size", [224, 100])
def test_wrapper_shapes(size):
    with torch.no_grad():
        out = UNet224(width=4).eval()(torch.randn(1, 6, size, size))
    assert out.shape == (1, 2, size, size)


def test_split_heads():
    out = torch.randn(2, 2, 8, 8)
    mask_logits, depth = split_heads(out)
    assert torch.equal(mask_logits, out[:, :1])
    assert torch.allclose(depth, out[:, 1:].sigmoid())


def test_gradients_reach_every_parameter():
    model = UNet(width=4)
    model(torch.randn(2, 6, 32, 32)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_frozen_spine_gets_no_gradient_and_head_does():
    model = freeze_spine(UNet224(width=4))
    model(torch.randn(2, 6, 64, 64)).square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("spine."):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - count_parameters(
        model.spine
    )


def test_frozen_spine_batchnorm_stays_in_eval_mode():
    model = freeze_spine(UNet224(width=4))
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.spine.modules())
    unfreeze_all(model)
    assert all(m.training for m in model.spine.modules())
    assert all(p.requires_grad for p in model.parameters())


def _batch(n: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.rand(n, 6, size, size, generator=g),
        "mask": (torch.rand(n, 1, size, size, generator=g) > 0.5).float(),
        "depth": torch.rand(n, 1, size, size, generator=g),
    }


def test_stage2_training_leaves_every_spine_tensor_bitwise_unchanged():
    torch.manual_seed(0)
    stage1 = UNet(width=4)
    stage1(torch.randn(2, 6, 32, 32))  # move BN running stats away from their init
    model = UNet224(width=4)
    model.spine.load_state_dict(stage1.state_dict())
    freeze_spine(model).train()
    before = {k: v.clone() for k, v in model.spine.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    # all parameters handed to the optimizer, with weight decay: frozen ones must still not move
    opt = make_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss = MultiTaskLoss()
    for i in range(3):
        out = train_step(model, _batch(2, 64, i), loss, opt)
        assert bool(out["finite"])
    for k, v in model.spine.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    # stage 3: everything trains again, spine included
    unfreeze_all(model).train()
    opt = make_optimizer(model.parameters(), lr=1e-2)
    train_step(model, _batch(2, 64, 9), loss, opt)
    assert not torch.equal(model.spine.inc.block[0].weight, before["inc.block.0.weight"])


def test_registry_errors_list_valid_names():
    with pytest.raises(ValueError, match="unet224") as e:
        build_model("vgg16")
    for name in model_names():
        assert name in str(e.value)
    assert set(model_names()) >= {"unet", "unet224", "resnet50", "resnet18_unet"}


def test_freeze_needs_a_spine():
    with pytest.raises(ValueError, match="spine"):
        freeze_spine(UNet(width=4))


def test_bad_width():
    with pytest.raises(ValueError, match="width"):
        UNet(width=3)
