"""The two alternatives the original work evaluated: a ResNet-50 with its last layers changed to emit
a 2-channel full-size map, and a ResNet-18 encoder with a UNet decoder.

The ResNet blocks are written here (torchvision's layout: same block structure and parameter shapes)
rather than imported from torchvision, whose install is multi-GB on CPU machines. No pretrained
weights are loaded (nothing downloads at run time); the stem takes 6 channels (fg_bg + bg).

* ``ResNet50Dense`` ("resnet50"): ResNet-50 body (stride 32) without avgpool/fc; new last layers =
  1x1 conv 32w -> 4w + BN + ReLU, 3x3 conv 4w -> 2, bilinear upsample to the input size.
* ``ResNet18UNet`` ("resnet18_unet"): ResNet-18 encoder (stem /2, layers /4 .. /32), decoder of four
  :class:`~ray_mmd.models.unet.Up` blocks over the encoder's skips, a last bilinear 2x up + double
  conv at full resolution, 1x1 conv to 2.

Outputs are raw (channel 0 mask logits, channel 1 depth logits), like the UNet.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ray_mmd.models.unet import DoubleConv, Up


def _conv_bn(in_ch: int, out_ch: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_ch, ch, 3, stride)
        self.conv2 = _conv_bn(ch, ch, 3)
        self.shortcut = _conv_bn(in_ch, ch, 1, stride) if stride != 1 or in_ch != ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv1(x), inplace=True)
        return F.relu(self.conv2(y) + self.shortcut(x), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        out = ch * self.expansion
        self.conv1 = _conv_bn(in_ch, ch, 1)
        self.conv2 = _conv_bn(ch, ch, 3, stride)  # stride on the 3x3 (torchvision's "v1.5")
        self.conv3 = _conv_bn(ch, out, 1)
        self.shortcut = _conv_bn(in_ch, out, 1, stride) if stride != 1 or in_ch != out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv1(x), inplace=True)
        y = F.relu(self.conv2(y), inplace=True)
        return F.relu(self.conv3(y) + self.shortcut(x), inplace=True)


class ResNetEncoder(nn.Module):
    """Stem (7x7/2 conv + BN + ReLU, then 3x3/2 max-pool) and four stages; returns every stage."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], layers: list[int], width: int = 64, in_channels: int = 6
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        chans, in_ch, stages = [], width, []
        for i, n in enumerate(layers):
            ch = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, ch, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
            chans.append(in_ch)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.channels = [width, *chans]  # stem, layer1..layer4

    def forward(self, x: Tensor) -> list[Tensor]:
        s = self.stem(x)  # /2
        f1 = self.layer1(self.pool(s))  # /4
        f2 = self.layer2(f1)  # /8
        f3 = self.layer3(f2)  # /16
        f4 = self.layer4(f3)  # /32
        return [s, f1, f2, f3, f4]


class ResNet50Dense(nn.Module):
    """ResNet-50 whose avgpool/fc are replaced by a small conv head and a bilinear upsample."""

    def __init__(self, width: int = 64, in_channels: int = 6, out_channels: int = 2) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(Bottleneck, [3, 4, 6, 3], width, in_channels)
        top = self.encoder.channels[-1]
        self.head = nn.Sequential(
            nn.Conv2d(top, 4 * width, 1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(4 * width, out_channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.head(self.encoder(x)[-1])
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ResNet18UNet(nn.Module):
    """ResNet-18 encoder + UNet decoder (bilinear up, pad, concat skip, double conv)."""

    def __init__(self, width: int = 64, in_channels: int = 6, out_channels: int = 2) -> None:
        super().__init__()
        w = width
        self.encoder = ResNetEncoder(BasicBlock, [2, 2, 2, 2], w, in_channels)
        # encoder channels: stem w, l1 w, l2 2w, l3 4w, l4 8w
        self.up1 = Up(8 * w + 4 * w, 4 * w)  # /32 -> /16
        self.up2 = Up(4 * w + 2 * w, 2 * w)  # -> /8
        self.up3 = Up(2 * w + w, w)  # -> /4
        self.up4 = Up(w + w, w)  # -> /2
        self.final = DoubleConv(w, w)  # at full resolution
        self.outc = nn.Conv2d(w, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s, f1, f2, f3, f4 = self.encoder(x)
        y = self.up1(f4, f3)
        y = self.up2(y, f2)
        y = self.up3(y, f1)
        y = self.up4(y, s)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.outc(self.final(y))
