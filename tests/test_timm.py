"""timm models as teachers and students: the CAM form of each supported family keeps
its logits, other heads are refused with their reason, weights load from local state
dicts and .safetensors files only, the normalisation comes from the pretrained_cfg, and
a timm teacher builds a cache that a timm student trains from."""

from __future__ import annotations

import io

import pytest
import timm
import torch
from safetensors.torch import save_file

from catkd.errors import ConfigError
from catkd.models import build_model, load_checkpoint, model_problem
from catkd.models.convert import CheckpointMismatchError, ConversionError
from pipeline.cache import CacheBuildConfig
from pipeline.train.config import TrainConfig

# The smallest model of each family whose head is GAP then one Linear layer.
SUPPORTED = {
    "resnet": ("resnet10t", {}),
    "efficientnet": ("efficientnet_lite0", {}),
    "regnet": ("regnetx_002", {}),
    "convnext": ("convnext_atto", {"head_norm_first": True}),
}


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_cam_form_keeps_the_logits_of_every_supported_family(family):
    name, kwargs = SUPPORTED[family]
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    spec = f"timm:{name}" + (":" + ",".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)  # a timm state dict, classifier form
    buffer.seek(0)
    loaded = load_checkpoint(buffer, spec, 7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, maps = loaded(x)
        expected = original(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert maps.shape == (2, 7, 2, 2)
    # P(cam) at 1x1 is the logits minus the bias: the maps are the classifier's, per location
    torch.testing.assert_close(maps.mean((2, 3)) + loaded.bias, expected, rtol=1e-4, atol=1e-5)
    # as a student it trains: normalisation layers follow train() and eval() (not frozen in one mode)
    norms = [m for m in loaded.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        before = norms[0].running_mean.clone()
        loaded.train()(x)
        assert not torch.equal(norms[0].running_mean, before)
    assert sum(p.requires_grad for p in loaded.parameters()) == len(list(loaded.parameters()))


@pytest.mark.parametrize(
    "name, reason",
    [
        ("timm:convnext_atto", "applies a LayerNorm \\(head.norm\\) to the pooled vector.*head_norm_first=true"),
        ("timm:mobilenetv3_small_050", "1x1 convolution and an activation \\(conv_head\\) to the pooled vector"),
        ("timm:vit_tiny_patch16_224", "classifies a token"),
    ],
)
def test_heads_without_a_cam_form_are_refused_with_the_reason(name, reason):
    with pytest.raises(ConversionError, match=f"{name}: no CAM form.*{reason}"):
        build_model(name, 10)


def test_unknown_timm_name_gives_close_matches():
    problem = model_problem("timm:resnet5O")
    assert "unknown timm model 'resnet5O'" in problem and "timm:resnet50" in problem
    with pytest.raises(ConfigError, match="student: unknown timm model 'resnet5O'.*close matches"):
        TrainConfig(data="d", mode="ce", student="timm:resnet5O")
    with pytest.raises(ConfigError, match="teacher: unknown timm model"):
        CacheBuildConfig(data="d", teacher="timm:efficientnet_bO", weights="w", root="r")


def test_safetensors_weights_load_and_foreign_weights_are_refused(tmp_path):
    original = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    loaded = load_checkpoint(str(path), "timm:resnet10t", 5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], original(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointMismatchError, match="weights do not fit timm:resnet10t with 9 classes.*shape"):
        load_checkpoint(str(path), "timm:resnet10t", 9)
    with pytest.raises(CheckpointMismatchError, match="weights do not fit timm:regnetx_002 with 5 classes"):
        load_checkpoint(str(path), "timm:regnetx_002", 5)


def test_normalisation_comes_from_the_pretrained_cfg_unless_set():
    vit_like = TrainConfig(data="d", mode="ce", student="timm:resnet10t", spec="cifar")
    assert vit_like.augment_spec().mean == pytest.approx((0.485, 0.456, 0.406))  # timm's, not the cifar spec's
    own = TrainConfig(data="d", mode="ce", student="timm:resnet10t", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert own.augment_spec().mean == (0.5, 0.5, 0.5) and own.augment_spec().std == (0.25, 0.25, 0.25)
    zoo = TrainConfig(data="d", mode="ce", student="resnet8", spec="cifar")
    assert zoo.augment_spec().mean == pytest.approx((0.4914, 0.4822, 0.4465))
    build = CacheBuildConfig(data="d", teacher="timm:resnet10t", weights="w", root="r", spec="cifar")
    assert build.augment_spec().std == pytest.approx((0.229, 0.224, 0.225))
    with pytest.raises(ConfigError, match="std: must be positive"):
        TrainConfig(data="d", mode="ce", std=[0.2, 0.0, 0.2])
    with pytest.raises(ConfigError, match="mean: expected 3 values"):
        CacheBuildConfig(data="d", teacher="resnet8", weights="w", root="r", mean=[0.5])


def test_timm_teacher_cache_and_timm_student_training(ray_local, tmp_path, shapes_64):
    """A timm teacher (state dict from timm) builds an imagenet-spec cache; a timm student
    of another family and normalisation trains from it with CAT-KD."""
    from pipeline.cache import TargetCache, build_cache
    from pipeline.train.run import train

    data = shapes_64
    torch.manual_seed(0)
    weights = str(tmp_path / "teacher.safetensors")
    teacher = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, weights)
    url = build_cache(
        CacheBuildConfig(
            data=data,
            teacher="timm:resnet10t",
            weights=weights,
            root=str(tmp_path / "caches"),
            spec="imagenet",
            num_views=2,
            storage="topk:3",
            batch_size=16,
            progress=False,
        )
    )
    identity = TargetCache(url).identity
    assert identity.teacher_arch == "timm:resnet10t" and identity.spec["mean"] == pytest.approx([0.485, 0.456, 0.406])
    result = train(
        TrainConfig(
            mode="catkd",
            student="timm:regnetx_002",
            std=[0.25, 0.25, 0.25],  # the student's own normalisation, on the same pixels
            data=data,
            cache=url,
            spec="imagenet",
            epochs=1,
            batch_size=8,
            loader_workers=0,
            storage_path=str(tmp_path / "runs"),
            name="timm-student",
        )
    )
    history = result["history"]
    assert len(history) == 1 and history[0]["train_cat"] > 0


def test_imagenet_timm_topk_config_loads_and_its_models_build():
    from pathlib import Path

    from pipeline.cache.layout import raw_bytes_per_view
    from pipeline.train.config import load_config

    path = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "imagenet_timm_resnet50_resnet18_topk.yaml"
    cfg = load_config(str(path), ["data=/data", "cache=/cache"])
    assert (cfg.teacher, cfg.student, cfg.resolution, cfg.batch_size * cfg.num_workers) == (
        "timm:resnet50.a1_in1k:pretrained=true",
        "timm:resnet18",
        4,
        512,
    )
    for name in (cfg.teacher, cfg.student):
        assert build_model(name, 1000).num_classes == 1000
    # the size its comment states
    assert raw_bytes_per_view("topk:50", 1000, 4) == 1822 and "1,822 B a view" in path.read_text()
