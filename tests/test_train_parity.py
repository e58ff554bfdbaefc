"""The heart of the project: for the same batch and views, the student's loss and
gradients from cached targets equal those from a live teacher, up to storage rounding."""

from __future__ import annotations

import pytest
import torch

from catkd.models import build_model, checkpoint_payload, load_checkpoint
from pipeline.cache import CacheBuildConfig, TargetCache, build_cache
from pipeline.data.loader import ReaderConfig, ShardStream
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.data.views import AugmentSpec, normalize_batch
from pipeline.train.config import TrainConfig
from pipeline.train.step import cached_targets, live_targets, loss_terms


def _setup(base, spec: str, image_size: int, storage: str = "float16"):
    data = str(base / f"shapes{image_size}")
    shard_dataset(
        ShardConfig(
            "synthetic:shapes",
            data,
            samples_per_shard=16,
            synthetic={"train_samples": 32, "test_samples": 8, "image_size": image_size, "seed": 6},
            progress=False,
        )
    )
    torch.manual_seed(1)
    weights = str(base / f"teacher-{spec}.pth")
    torch.save(checkpoint_payload(build_model("resnet8", 10, bias=True), "resnet8"), weights)
    cache = build_cache(
        CacheBuildConfig(
            data=data,
            teacher="resnet8",
            weights=weights,
            root=str(base / "caches"),
            num_views=2,
            spec=spec,
            storage=storage,
            progress=False,
        )
    )
    return data, weights, cache


@pytest.fixture(scope="module")
def cifar(ray_local, tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("parity"), "cifar", 32)


@pytest.fixture(scope="module")
def imagenet(ray_local, tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("parity-in"), "imagenet", 64)


def _loss_and_grads(cfg, student, x, labels, t_cam, t_logits, epoch=0):
    student.zero_grad()
    logits, cam = student(x)
    terms = loss_terms(cfg, logits, cam, labels, t_cam, t_logits, epoch=epoch)
    terms["loss"].backward()
    return terms, [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"normalize": True},
        {"select_n": 3},
        {"select_n": 2, "select_strategy": "bottom", "normalize": True},
        {"mode": "cat"},
    ],
)
@pytest.mark.parametrize("which", ["cifar", "imagenet"])
@pytest.mark.slow  # its Ray fixture comes through getfixturevalue, which conftest's marking cannot see
def test_cached_equals_live(request, which, variant):
    data, weights, cache = request.getfixturevalue(which)
    spec = AugmentSpec.preset(which)
    base = dict(
        mode="catkd",
        data=data,
        cache=cache,
        beta=3.0,
        resolution=2,
        teacher="resnet8",
        teacher_weights=weights,
        num_views=2,
    )
    cfg = TrainConfig(**(base | variant))
    stream = ShardStream(
        ReaderConfig(data=data, batch_size=8, spec=spec, num_views=2, normalize=False, targets=TargetCache(cache))
    )
    stream.set_epoch(1)  # view 1
    batch = next(iter(stream))
    x = normalize_batch(spec, batch["image"])
    teacher = load_checkpoint(weights, "resnet8", 10).eval()
    live_cam, live_logits = live_targets(cfg, teacher, x)
    assert batch["t_cam"].dtype == torch.float16  # targets leave the loader in their stored form
    t_cam, t_logits, _ = cached_targets(batch, torch.device("cpu"))
    torch.testing.assert_close(t_cam, live_cam, rtol=2e-3, atol=2e-3 * float(live_cam.abs().max()))

    torch.manual_seed(0)
    student = build_model("resnet8", 10)
    cached_terms, cached_grads = _loss_and_grads(cfg, student, x, batch["label"], t_cam, t_logits)
    live_terms, live_grads = _loss_and_grads(cfg, student, x, batch["label"], live_cam, live_logits)
    assert set(cached_terms) == set(live_terms)
    for name in cached_terms:
        torch.testing.assert_close(cached_terms[name], live_terms[name], rtol=5e-3, atol=1e-5)
    for g_cached, g_live in zip(cached_grads, live_grads, strict=True):
        torch.testing.assert_close(g_cached, g_live, rtol=1e-2, atol=1e-2 * float(g_live.abs().max()) + 1e-7)


@pytest.mark.parametrize(
    "variant",
    [
        {"mode": "kd"},
        {"mode": "kd", "logit_std": True},
        {"mode": "dkd", "dkd_warmup": 4},
        {"mode": "dkd", "logit_std": True},
        {"mode": "dist", "kd_temperature": 1.0},
    ],
)
def test_logit_methods_from_cached_logits_equal_their_online_twins(cifar, variant):
    """mode=M from the cache and mode=online-M with the live teacher: the same terms and
    gradients (within the cache's float16 logits)."""
    data, weights, cache = cifar
    spec = AugmentSpec.preset("cifar")
    cached_cfg = TrainConfig(**{"data": data, "cache": cache} | variant)
    online_cfg = TrainConfig(
        **{"data": data, "teacher": "resnet8", "teacher_weights": weights}
        | variant
        | {"mode": f"online-{variant['mode']}"}
    )
    assert cached_cfg.needs_cache and not online_cfg.needs_cache and online_cfg.method == cached_cfg.method
    stream = ShardStream(
        ReaderConfig(data=data, batch_size=8, spec=spec, num_views=2, normalize=False, targets=TargetCache(cache))
    )
    batch = next(iter(stream))
    x = normalize_batch(spec, batch["image"])
    live_cam, live_logits = live_targets(online_cfg, load_checkpoint(weights, "resnet8", 10).eval(), x)
    t_cam, t_logits, _ = cached_targets(batch, torch.device("cpu"))
    torch.manual_seed(0)
    student = build_model("resnet8", 10)
    epoch = 1  # DKD's warm-up at 2/4
    cached, cached_grads = _loss_and_grads(cached_cfg, student, x, batch["label"], t_cam, t_logits, epoch)
    live, live_grads = _loss_and_grads(online_cfg, student, x, batch["label"], live_cam, live_logits, epoch)
    method = cached_cfg.method
    assert set(cached) == set(live) == {"loss", "ce", method}
    assert float(cached[method].detach()) > 0
    for name in cached:
        torch.testing.assert_close(cached[name], live[name], rtol=5e-3, atol=1e-5)
    for g_cached, g_live in zip(cached_grads, live_grads, strict=True):
        torch.testing.assert_close(g_cached, g_live, rtol=1e-2, atol=1e-2 * float(g_live.abs().max()) + 1e-7)
    if method == "dkd":  # the warm-up weighs the term: epoch 2 of a 4-epoch warm-up, half of it
        warmup = {4: 0.5, 20: 0.1}[cached_cfg.dkd_warmup]
        torch.testing.assert_close(cached["loss"], cached["ce"] + warmup * cached["dkd"])
