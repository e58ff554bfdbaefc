"""MobileNetV2 for CIFAR: the half-width variant of the reference code base.

Expansion 6, width 0.5, a 1280-channel last 1x1 convolution; a 32x32 input ends at 2x2.
"""

from __future__ import annotations

import torch
from torch import nn

from catkd.models.cam import CAMClassifier
from catkd.models.cifar_resnet import init_conv_bn
from catkd.models.registry import register_model


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    # (expansion, channels, repeats, first stride) per stage; expansion None means `expand`.
    STAGES = [
        (1, 16, 1, 1),
        (None, 24, 2, 1),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    ]

    def __init__(self, expand: int = 6, width: float = 0.5) -> None:
        super().__init__()
        channels = int(32 * width)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.STAGES:
            out = int(c * width)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(channels, out, s if i == 0 else 1, t or expand))
                channels = out
            self.blocks.append(nn.Sequential(*stage))
        self.num_features = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.num_features, 1, 1)
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.conv2(x)


def MobileNetV2(num_classes: int = 100, bias: bool = False) -> CAMClassifier:
    return CAMClassifier(MobileNetV2Cifar(), num_classes, bias=bias, source_head="classifier.0")


register_model("MobileNetV2", MobileNetV2, input_size=32, family="cifar")
