"""The CAM contract over the whole registry, the zoo's sizes, and the one conversion."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from catkd.models import (
    CheckpointMismatchError,
    ConversionError,
    build_model,
    cam_from_classifier,
    checkpoint_payload,
    identify_architecture,
    list_models,
    load_checkpoint,
    model_entry,
)

# Classifier-form parameter counts of the reference code base (mdistiller), 100 classes.
REFERENCE_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "ResNet50": 23_705_252,
    "ResNet18": 11_220_132,
}
CAM_SIDE = {name: 8 for name in REFERENCE_PARAMS if name.startswith(("resnet", "wrn"))}
CAM_SIDE |= {"vgg8": 4, "vgg11": 4, "vgg13": 4, "vgg16": 4, "vgg19": 4, "ShuffleV1": 4, "ShuffleV2": 4}
CAM_SIDE |= {"ResNet50": 4, "ResNet18": 4, "MobileNetV2": 2}
IMAGENET = ["tv_resnet18", "tv_resnet34", "tv_resnet50", "tv_mobilenet_v2"]


def test_registry_holds_the_whole_zoo():
    assert set(REFERENCE_PARAMS) <= set(list_models("cifar"))
    assert set(IMAGENET) <= set(list_models("imagenet"))


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_cifar_parameter_counts_match_reference(name):
    model = build_model(name, 100)
    # CAM form drops the classifier bias: exactly num_classes fewer parameters.
    assert sum(p.numel() for p in model.parameters()) + 100 == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", list_models())
def test_cam_contract(name):
    torch.manual_seed(0)
    entry = model_entry(name)
    num_classes = 7
    model = build_model(name, num_classes, bias=True).eval()
    with torch.no_grad():
        model.bias.normal_()
    size = entry.input_size if entry.family == "cifar" else 64  # small input keeps ImageNet models fast
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        logits, cam = model(x)
    assert features.ndim == 4 and features.shape[1] == model.num_features
    assert cam.shape == (2, num_classes, *features.shape[-2:])
    torch.testing.assert_close(logits, cam.mean(dim=(2, 3)) + model.bias, rtol=1e-5, atol=1e-5)
    if name in CAM_SIDE:
        assert cam.shape[-2:] == (CAM_SIDE[name], CAM_SIDE[name])
    student = build_model(name, num_classes)
    assert student.bias is None


def test_imagenet_cam_is_7x7_at_224():
    with torch.no_grad():
        _, cam = build_model("tv_resnet18", 10).eval()(torch.randn(1, 3, 224, 224))
    assert cam.shape == (1, 10, 7, 7)


def test_reference_layer_names_load_reference_checkpoints():
    # Spot checks of key names the reference code base's checkpoints use.
    expected = {
        "resnet56": ["conv1.weight", "layer3.0.downsample.0.weight", "fc.weight", "fc.bias"],
        "wrn_40_2": ["block1.layer.0.convShortcut.weight", "bn1.running_mean", "fc.weight"],
        "vgg13": ["block0.0.weight", "block4.4.running_var", "classifier.weight"],
        "MobileNetV2": ["conv1.0.weight", "blocks.1.0.conv.3.weight", "conv2.1.weight", "classifier.0.weight"],
        "ShuffleV1": ["layer1.0.conv1.weight", "layer3.3.bn3.bias", "linear.weight"],
        "ShuffleV2": ["layer1.0.conv5.weight", "layer3.3.conv3.weight", "conv2.weight", "linear.weight"],
        "ResNet50": ["layer2.0.shortcut.0.weight", "layer4.2.bn3.weight", "linear.weight"],
    }
    for name, keys in expected.items():
        state = build_model(name, 100, bias=True).classifier_state_dict()
        assert set(keys) <= set(state), name


def _classifier_logits(model, x):
    """Independent classifier-form forward: GAP(features) then Linear with the head's weights."""
    features = model.forward_features(x)
    weight = model.head.weight.flatten(1)
    return nn.functional.linear(features.mean(dim=(2, 3)), weight, model.bias)


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet18"])
def test_reference_checkpoint_conversion_keeps_logits(tmp_path, name):
    torch.manual_seed(1)
    source = build_model(name, 100, bias=True).eval()
    with torch.no_grad():
        source.bias.normal_()
        for m in source.modules():  # non-trivial BatchNorm statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    # The reference saves {"model": state_dict} with DataParallel's "module." prefix.
    state = {f"module.{k}": v for k, v in source.classifier_state_dict().items()}
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": state, "epoch": 240}, path)
    converted = load_checkpoint(str(path), name, 100).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x)[0], _classifier_logits(source, x))
        torch.testing.assert_close(converted(x)[0], source(x)[0])


@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.mobilenet_v2])
def test_torchvision_conversion_keeps_logits(tmp_path, factory):
    torch.manual_seed(2)
    classifier = factory(weights=None, num_classes=10).eval()
    with torch.no_grad():
        for m in classifier.modules():
            if isinstance(m, nn.Linear):
                m.bias.normal_()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = classifier(x)
        cam_model = cam_from_classifier(classifier).eval()
        torch.testing.assert_close(cam_model(x)[0], expected, rtol=1e-4, atol=1e-4)
    # A plain torchvision state dict on disk converts the same way, through the registry.
    path = tmp_path / "tv.pth"
    torch.save(classifier.state_dict(), path)
    name = {"resnet18": "tv_resnet18", "mobilenet_v2": "tv_mobilenet_v2"}[factory.__name__]
    loaded = load_checkpoint(str(path), name, 10).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], expected, rtol=1e-4, atol=1e-4)


def test_own_checkpoint_round_trip(tmp_path):
    model = build_model("resnet8", 10, bias=True).eval()
    path = tmp_path / "own.pth"
    torch.save(checkpoint_payload(model, "resnet8"), path)
    loaded = load_checkpoint(str(path), "resnet8", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])
    with pytest.raises(CheckpointMismatchError, match=r"resnet8 checkpoint with 10 classes, not resnet20 with 10"):
        load_checkpoint(str(path), "resnet20", 10)


def test_checkpoint_for_other_architecture_names_both(tmp_path):
    path = tmp_path / "r20.pth"
    torch.save({"model": build_model("resnet20", 100, bias=True).classifier_state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(str(path), "resnet56", 100)
    message = str(err.value)
    assert "resnet56" in message and "resnet20 with 100 classes" in message and str(path) in message


def test_checkpoint_for_other_class_count_names_both(tmp_path):
    path = tmp_path / "r20.pth"
    torch.save(build_model("resnet20", 10, bias=True).classifier_state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(str(path), "resnet20", 100)
    assert "resnet20 with 100 classes" in str(err.value) and "resnet20 with 10 classes" in str(err.value)


def test_identify_architecture_cam_form():
    state = build_model("wrn_16_1", 5).state_dict()
    assert identify_architecture(state) == ["wrn_16_1 with 5 classes"]


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="broken.pth"):
        load_checkpoint(str(path), "resnet8", 10)


class _TwoLayerHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.pool(self.conv(x)).flatten(1))))


class _MaxPoolHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.amax(self.conv(x), dim=(2, 3)))


@pytest.mark.parametrize("model", [_TwoLayerHead(), _MaxPoolHead(), torchvision.models.vgg11(weights=None)])
def test_conversion_refuses_heads_that_are_not_gap_linear(model):
    with pytest.raises(ConversionError, match="global average pooling|one nn.Linear"):
        cam_from_classifier(model)
