"""VGG with batch norm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19).

Five convolution blocks; max pooling between the first four, so a 32x32 input gives
the 4x4 map the reference pools (a 64x64 input gets one more pooling, as there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from catkd.models.cam import CAMClassifier
from catkd.models.cifar_resnet import init_conv_bn
from catkd.models.registry import register_model

_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _conv_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    # The block ends on BatchNorm (the reference's layout, so its state dicts load);
    # forward_features applies the ReLU.
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, config: list[list[int]]) -> None:
        super().__init__()
        in_channels = [3] + [widths[-1] for widths in config[:-1]]
        for i, (widths, cin) in enumerate(zip(config, in_channels, strict=True)):
            self.add_module(f"block{i}", _conv_block(widths, cin))
        self.num_features = config[-1][-1]
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        large_input = x.shape[2] == 64
        for i in range(5):
            x = F.relu(getattr(self, f"block{i}")(x))
            if i < 3 or (i == 3 and large_input):
                x = F.max_pool2d(x, 2)
        return x


def _builder(config: list[list[int]]):
    def build(num_classes: int = 100, bias: bool = False) -> CAMClassifier:
        return CAMClassifier(VGG(config), num_classes, bias=bias, source_head="classifier")

    return build


for _name, _config in _CONFIGS.items():
    register_model(_name, _builder(_config), input_size=32, family="cifar")
