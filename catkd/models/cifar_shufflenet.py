"""ShuffleNet V1 (groups 3) and V2 (1x) for CIFAR, as in the reference code base.

Both end at 4x4 for a 32x32 input; V1's CAM is the last block's output, V2's the
output of its final 1x1 convolution, after BatchNorm and ReLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from catkd.models.cam import CAMClassifier
from catkd.models.cifar_resnet import init_conv_bn
from catkd.models.registry import register_model


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, g*k, H, W) -> interleave the g groups' channels."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # The first block sees the 24-channel stem, too few channels for groups.
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, out_planes=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for i, (planes, count) in enumerate(zip(out_planes, blocks, strict=True)):
            layer = []
            for j in range(count):
                # A downsampling block concatenates its input, so it makes only the rest.
                layer.append(
                    ShuffleV1Block(in_planes, planes - (in_planes if j == 0 else 0), 2 if j == 0 else 1, groups)
                )
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.num_features = out_planes[-1]
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


class ShuffleV2Basic(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleV2Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths=(116, 232, 464, 1024), blocks=(3, 7, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (width, count) in enumerate(zip(widths[:3], blocks, strict=True)):
            layer = [ShuffleV2Down(cin, width)] + [ShuffleV2Basic(width) for _ in range(count)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            cin = width
        self.conv2 = nn.Conv2d(cin, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.num_features = widths[3]
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.relu(self.bn2(self.conv2(x)))


def ShuffleV1(num_classes: int = 100, bias: bool = False) -> CAMClassifier:
    return CAMClassifier(ShuffleNetV1(), num_classes, bias=bias, source_head="linear")


def ShuffleV2(num_classes: int = 100, bias: bool = False) -> CAMClassifier:
    return CAMClassifier(ShuffleNetV2(), num_classes, bias=bias, source_head="linear")


register_model("ShuffleV1", ShuffleV1, input_size=32, family="cifar")
register_model("ShuffleV2", ShuffleV2, input_size=32, family="cifar")
