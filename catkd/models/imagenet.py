"""ImageNet models from torchvision, put in CAM form by the one generic conversion.

Names carry a ``tv_`` prefix so they never clash with the CIFAR zoo's ResNet18/50.
The CAM comes from the last feature map before global pooling (7x7 for 224x224 input).
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from catkd.models.cam import CAMClassifier
from catkd.models.convert import cam_from_classifier
from catkd.models.registry import register_model

TORCHVISION_MODELS: dict[str, Callable[..., nn.Module]] = {
    "tv_resnet18": torchvision.models.resnet18,
    "tv_resnet34": torchvision.models.resnet34,
    "tv_resnet50": torchvision.models.resnet50,
    "tv_mobilenet_v2": torchvision.models.mobilenet_v2,
}


def _builder(factory: Callable[..., nn.Module]):
    def build(num_classes: int = 1000, bias: bool = False) -> CAMClassifier:
        # weights=None: random here; tv_NAME:weights=ENUM is loaded by catkd.models.pretrained.
        return cam_from_classifier(factory(weights=None, num_classes=num_classes), bias=bias)

    return build


for _name, _factory in TORCHVISION_MODELS.items():
    register_model(
        _name,
        _builder(_factory),
        input_size=224,
        family="imagenet",
        weights_enum=lambda factory=_factory: torchvision.models.get_model_weights(factory),
    )
