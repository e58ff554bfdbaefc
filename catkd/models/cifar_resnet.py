"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

Layer names and shapes follow the reference code base (mdistiller) so that its
checkpoints load and parameter counts match; the CAM is taken from the last
post-ReLU map, 8x8 for 32x32 input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from catkd.models.cam import CAMClassifier
from catkd.models.registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """conv -> three stages of basic blocks; depth = 6n + 2."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[1], blocks, 1)
        self.layer2 = self._make_layer(widths[2], blocks, 2)
        self.layer3 = self._make_layer(widths[3], blocks, 2)
        self.num_features = widths[3]
        init_conv_bn(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


def init_conv_bn(module: nn.Module) -> None:
    """He-normal convolutions, unit BatchNorm: the usual CIFAR initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _builder(depth: int, widths: tuple[int, int, int, int]):
    def build(num_classes: int = 100, bias: bool = False) -> CAMClassifier:
        return CAMClassifier(CifarResNet(depth, widths), num_classes, bias=bias, source_head="fc")

    return build


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)
VARIANTS = {
    "resnet8": (8, _NARROW),
    "resnet14": (14, _NARROW),
    "resnet20": (20, _NARROW),
    "resnet32": (32, _NARROW),
    "resnet44": (44, _NARROW),
    "resnet56": (56, _NARROW),
    "resnet110": (110, _NARROW),
    "resnet8x4": (8, _WIDE),
    "resnet32x4": (32, _WIDE),
}
for _name, (_depth, _widths) in VARIANTS.items():
    register_model(_name, _builder(_depth, _widths), input_size=32, family="cifar")
