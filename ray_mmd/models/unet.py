"""The original work's UNet spine, its 224x224 head/tail wrapper, and the spine freeze helpers.

Channel plan at ``width`` w (the original: w = 64):

* spine ("unet"): 6 -> 2 channels, 4 down / 4 up, bilinear upsampling, conv biases on, the bottom
  block at 8w (bilinear "factor 2"), up-block double convs with a middle width of in/2. Sizes not
  divisible by 16 (56x56) are handled like the original: the upsampled map is zero-padded to its skip
  connection's size. 17,269,186 parameters at w = 64.
* wrapper ("unet224", the original's "Modified UNet-224"): head = double conv (6 -> w) + down
  (max-pool, double conv w -> 2w) + max-pool + 1x1 conv (2w -> 6, no bias) + BatchNorm(6), i.e.
  224 -> 56; then the spine; tail = bilinear upsample back to the input size (4x). 17,532,622
  parameters at w = 64; ``.spine`` is the inner spine so stage 2 can load stage-1 weights into it.

Both return raw outputs: channel 0 = mask logits, channel 1 = depth logits. Activations (sigmoid on
both) are applied by the losses and by :func:`ray_mmd.models.split_heads`, not here, so the model can
run under bf16 autocast while losses run in fp32 (and BCEWithLogits stays numerically stable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DoubleConv(nn.Module):
    """(conv 3x3 -> BN -> ReLU) x 2."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None) -> None:
        super().__init__()
        mid_ch = mid_ch or out_ch
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Down(nn.Module):
    """Max-pool 2x2, then a double conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_ch, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """Bilinear 2x upsample, zero-pad to the skip's size, concatenate, double conv (middle = in/2)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_ch, out_ch, in_ch // 2)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        dy = skip.shape[-2] - x.shape[-2]
        dx = skip.shape[-1] - x.shape[-1]
        if dy or dx:
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """The spine: 6 -> 2 channels, any input size >= 16 (the original trained it at 56x56)."""

    def __init__(self, width: int = 64, in_channels: int = 6, out_channels: int = 2) -> None:
        super().__init__()
        if width < 2 or width % 2:
            raise ValueError(f"UNet width must be an even integer >= 2, got {width}")
        w = width
        self.width = w
        self.inc = DoubleConv(in_channels, w)
        self.down1 = Down(w, 2 * w)
        self.down2 = Down(2 * w, 4 * w)
        self.down3 = Down(4 * w, 8 * w)
        self.down4 = Down(8 * w, 8 * w)  # 16w // 2: bilinear "factor"
        self.up1 = Up(16 * w, 4 * w)
        self.up2 = Up(8 * w, 2 * w)
        self.up3 = Up(4 * w, w)
        self.up4 = Up(2 * w, w)
        self.outc = nn.Conv2d(w, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


class UNet224(nn.Module):
    """Head (224 -> 56, 6 channels) + spine + tail (bilinear back to the input size).

    ``spine_frozen`` (set by :func:`freeze_spine`) keeps the spine in eval mode through ``train()``, so
    its BatchNorm running statistics do not move while the head and tail train (stage 2).
    """

    def __init__(self, width: int = 64, in_channels: int = 6, out_channels: int = 2) -> None:
        super().__init__()
        w = width
        self.head = nn.Sequential(
            DoubleConv(in_channels, w),
            Down(w, 2 * w),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
        )
        self.spine = UNet(width, in_channels, out_channels)
        self.spine_frozen = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.spine(self.head(x))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def train(self, mode: bool = True) -> UNet224:
        super().train(mode)
        if self.spine_frozen:
            self.spine.eval()
        return self


def freeze_spine(model: nn.Module) -> nn.Module:
    """Stage 2: spine parameters stop requiring grad and its BatchNorm stays in eval mode."""
    spine = getattr(model, "spine", None)
    if not isinstance(spine, nn.Module):
        raise ValueError(f"{type(model).__name__} has no .spine to freeze (use 'unet224')")
    for p in spine.parameters():
        p.requires_grad_(False)
    model.spine_frozen = True
    model.train(model.training)
    return model


def unfreeze_all(model: nn.Module) -> nn.Module:
    """Stage 3: every parameter trains again; BatchNorm follows ``model.training``."""
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "spine_frozen"):
        model.spine_frozen = False
    model.train(model.training)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
