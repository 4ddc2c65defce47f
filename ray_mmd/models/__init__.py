"""Models: the UNet spine, its 224 head/tail wrapper, the ResNet alternatives, and the registry.

Every model maps N x 6 x H x W (fg_bg and bg, concatenated) to N x 2 x H x W raw outputs:
channel 0 = mask logits, channel 1 = depth logits. Both heads get a sigmoid (targets live in [0,1]);
the losses apply it themselves and :func:`split_heads` applies it for inference and metrics.
"""

from __future__ import annotations

from torch import Tensor

from ray_mmd.models.registry import MODELS, UnknownModelError, build_model, model_names, register_model
from ray_mmd.models.resnet import ResNet18UNet, ResNet50Dense
from ray_mmd.models.unet import UNet, UNet224, count_parameters, freeze_spine, unfreeze_all


def split_heads(out: Tensor) -> tuple[Tensor, Tensor]:
    """Raw model output -> (mask logits N x 1 x H x W, depth in [0,1] N x 1 x H x W)."""
    return out[:, 0:1], out[:, 1:2].float().sigmoid()


__all__ = [
    "MODELS",
    "ResNet18UNet",
    "ResNet50Dense",
    "UNet",
    "UNet224",
    "UnknownModelError",
    "build_model",
    "count_parameters",
    "freeze_spine",
    "model_names",
    "register_model",
    "split_heads",
    "unfreeze_all",
]
