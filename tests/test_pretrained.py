"""Pretrained teachers and students by their hub names, from hub caches the tests lay out
as the hubs' own clients do (nothing is downloaded: the suite runs with HF_HUB_OFFLINE)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from catkd.models import build_model, checkpoint_payload
from catkd.models.hub import WeightsUnavailableError, resolve_weights, wants_pretrained
from catkd.models.pretrained import build_pretrained
from pipeline.cli import main
from tests.helpers.hub_datasets import COMMIT, put_in_hf_cache, timm_repo_files


def safetensors_bytes(model: torch.nn.Module, tmp: Path) -> bytes:
    path = tmp / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.read_bytes()


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """Empty hub caches of this test's own (HF_HUB_CACHE, TORCH_HOME)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_timm_tag_resolves_from_the_hf_cache_and_loads_backbone_and_head(hub_env):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=1000)
    put_in_hf_cache(
        str(hub_env / "hf"), "timm/resnet10t.c3_in1k", {"model.safetensors": safetensors_bytes(source, hub_env)}
    )
    name = "timm:resnet10t.c3_in1k:pretrained=true"
    assert wants_pretrained(name) and not wants_pretrained("timm:resnet10t.c3_in1k")
    assert resolve_weights(name).endswith(f"snapshots/{COMMIT}/model.safetensors")

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.eval()(x)
        with_bias = build_pretrained(name, 1000, bias=True).eval()  # its own head: timm's logits
        assert torch.allclose(with_bias(x)[0], expected, atol=1e-4)
        student = build_pretrained(name, 1000).eval()  # a CAM student has no bias: the head's weights
        assert torch.allclose(student(x)[0] + source.fc.bias, expected, atol=1e-4)
    fine_tune = build_pretrained(name, 10)  # another label set: the backbone only
    assert torch.equal(fine_tune.backbone.conv1[0].weight, source.conv1[0].weight)
    assert fine_tune.head.weight.shape[0] == 10
    assert not torch.equal(build_model(name, 10).backbone.conv1[0].weight, source.conv1[0].weight)


def test_torchvision_weights_enum_resolves_from_the_torch_hub_cache(hub_env):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=1000).eval()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    folder = hub_env / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(source.state_dict(), folder / os.path.basename(url))
    model = build_pretrained("tv_resnet18:weights=IMAGENET1K_V1", 1000, bias=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x)[0], source(x), atol=1e-4)


def test_missing_weights_offline_is_one_line_naming_model_file_place_and_command(hub_env):
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_weights("timm:resnet10t.c3_in1k:pretrained=true")
    line = str(info.value)
    assert "\n" not in line
    for part in ("timm:resnet10t.c3_in1k", "model.safetensors", str(hub_env / "hf"), "hf download timm/resnet10t"):
        assert part in line, line
    with pytest.raises(WeightsUnavailableError, match=r"resnet18-f37072fd\.pth.*curl -L"):
        resolve_weights("tv_resnet18:weights=IMAGENET1K_V1")


def test_cli_refuses_missing_weights_and_foreign_architectures_in_one_line(hub_env, shapes_64, capsys):
    build = ["cache", "build", "--data", shapes_64, "--root", str(hub_env / "caches")]
    assert main(build + ["--teacher", "timm:resnet10t.c3_in1k:pretrained=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hf download timm/resnet10t.c3_in1k model.safetensors" in err, err
    assert main(build + ["--teacher", "resnet8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "weights: required for teacher resnet8" in err, err
    assert main(build + ["--teacher", "tv_resnet18:weights=IMAGENET9K"]) == 2
    assert "has no weights 'IMAGENET9K'; it has IMAGENET1K_V1, DEFAULT" in capsys.readouterr().err

    from catkd.models import CheckpointMismatchError, load_checkpoint

    checkpoint = hub_env / "resnet8.pt"
    torch.save(checkpoint_payload(build_model("resnet8", 10, bias=True), "resnet8")["state_dict"], checkpoint)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(str(checkpoint), "timm:resnet10t", 10)
    line = str(info.value)
    assert (
        line
        == f"{checkpoint}: weights do not fit timm:resnet10t with 10 classes; it looks like resnet8 with 10 classes"
    )


def test_pretrained_teacher_builds_a_cache_identified_by_its_file_and_verifies(ray_local, hub_env, shapes_64):
    """A teacher by hub name (a team's own fine-tuned repo: config.json and
    model.safetensors) builds a cache with no --weights; the file's sha256 identifies
    it; verify finds the same file again; the head's class count must be the data's."""
    from pipeline.cache import TargetCache, build_cache
    from pipeline.cache.config import CacheBuildConfig
    from pipeline.cache.verify import verify_cache

    files = timm_repo_files("resnet10t", 10, seed=1, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    weights = files["model.safetensors"]
    put_in_hf_cache(str(hub_env / "hf"), "acme/resnet10t-shapes", files)
    cfg = CacheBuildConfig(
        data=shapes_64,
        teacher="timm:hf-hub:acme/resnet10t-shapes:pretrained=true",
        root=str(hub_env / "caches"),
        spec="imagenet",
        num_views=2,
        storage="topk:3",
        batch_size=16,
        progress=False,
    )
    url = build_cache(cfg)
    cache = TargetCache(url)
    assert cache.identity.teacher_sha256 == hashlib.sha256(weights).hexdigest()
    assert cache.identity.spec["mean"] == pytest.approx([0.5, 0.5, 0.5])  # the repo's config.json
    assert cache.manifest["teacher_weights"] is None
    assert verify_cache(url, sample_views=1) == []

    # A pretrained student by the same kind of name, fine-tuned by distillation on Ray
    # Train's workers, which find the file through the driver's hub settings.
    from pipeline.train.config import TrainConfig
    from pipeline.train.run import train

    result = train(
        TrainConfig(
            mode="catkd",
            student="timm:hf-hub:acme/resnet10t-shapes:pretrained=true",
            data=shapes_64,
            cache=url,
            spec="imagenet",
            mean=[0.5, 0.5, 0.5],
            std=[0.25, 0.25, 0.25],
            epochs=1,
            batch_size=8,
            loader_workers=0,
            storage_path=str(hub_env / "runs"),
            name="pretrained-student",
        )
    )
    assert result["history"][0]["train_cat"] > 0
