"""Wide ResNets for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2), pre-activation blocks.

The CAM comes from relu(bn1(block3)), the map the reference code base pools (8x8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from catkd.models.cam import CAMClassifier
from catkd.models.cifar_resnet import init_conv_bn
from catkd.models.registry import register_model


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # As in the reference: an identity shortcut skips the pre-activation,
        # a projection shortcut takes it.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return out + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.num_features = widths[3]
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn1(x))


def _builder(depth: int, widen: int):
    def build(num_classes: int = 100, bias: bool = False) -> CAMClassifier:
        return CAMClassifier(WideResNet(depth, widen), num_classes, bias=bias, source_head="fc")

    return build


for _name, (_depth, _widen) in {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}.items():
    register_model(_name, _builder(_depth, _widen), input_size=32, family="cifar")
