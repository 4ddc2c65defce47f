"""Models by name: ``build_model("unet224", width=64)`` from a config value."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ray_mmd.errors import UserError
from ray_mmd.models.resnet import ResNet18UNet, ResNet50Dense
from ray_mmd.models.unet import UNet, UNet224


class UnknownModelError(UserError, ValueError):
    """A model name that is not registered (a ValueError, and a UserError for the CLI)."""


MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``factory(width=..., **kw)`` buildable as ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return deco


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, width: int = 64, **kw) -> nn.Module:
    """Build a registered model; unknown names raise one error that lists the valid ones."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; valid models: {', '.join(model_names())}") from None
    return factory(width=width, **kw)


register_model("unet")(UNet)
register_model("unet224")(UNet224)
register_model("resnet50")(ResNet50Dense)
register_model("resnet18_unet")(ResNet18UNet)
