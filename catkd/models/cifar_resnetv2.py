"""ResNet18 and ResNet50, CIFAR variants (3x3 stem, no max pooling).

ResNet18's map is 4x4 after four stages for a 32x32 input, as is ResNet50's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from catkd.models.cam import CAMClassifier
from catkd.models.cifar_resnet import init_conv_bn
from catkd.models.registry import register_model


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(cin, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetV2(nn.Module):
    def __init__(self, block: type[Basic] | type[Bottleneck], counts: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            layer = []
            for j in range(count):
                layer.append(block(cin, planes, (1 if i == 0 else 2) if j == 0 else 1))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.num_features = cin
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def ResNet18(num_classes: int = 100, bias: bool = False) -> CAMClassifier:
    return CAMClassifier(CifarResNetV2(Basic, (2, 2, 2, 2)), num_classes, bias=bias, source_head="linear")


def ResNet50(num_classes: int = 100, bias: bool = False) -> CAMClassifier:
    return CAMClassifier(CifarResNetV2(Bottleneck, (3, 4, 6, 3)), num_classes, bias=bias, source_head="linear")


register_model("ResNet18", ResNet18, input_size=32, family="cifar")
register_model("ResNet50", ResNet50, input_size=32, family="cifar")
