"""Views: replayable parameters, their statistics, application, and spec changes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.data.views import (
    RENDERER_VERSION,
    AugmentSpec,
    ViewMismatchError,
    check_params,
    eval_transform,
    normalize_batch,
    render_views,
    view_params,
)

CIFAR = AugmentSpec.preset("cifar", seed=3)
IMAGENET = AugmentSpec.preset("imagenet", seed=3)


def test_params_are_the_same_in_another_process():
    here = view_params(CIFAR, np.arange(20), 2, (32, 32)).tolist()
    code = (
        "import numpy as np; from pipeline.data.views import AugmentSpec, view_params; "
        "print(view_params(AugmentSpec.preset('cifar', seed=3), np.arange(20), 2, (32, 32)).tolist())"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(there) == here


def test_params_depend_on_seed_id_and_view_only():
    a = view_params(CIFAR, np.array([5, 9]), 1, (32, 32))
    b = view_params(CIFAR, np.array([9, 5, 100]), 1, (32, 32))
    assert a[0].tolist() == b[1].tolist() and a[1].tolist() == b[0].tolist()
    assert not np.array_equal(
        view_params(CIFAR, np.arange(50), 0, (32, 32)), view_params(CIFAR, np.arange(50), 1, (32, 32))
    )
    other_seed = AugmentSpec.preset("cifar", seed=4)
    assert not np.array_equal(
        view_params(CIFAR, np.arange(50), 0, (32, 32)), view_params(other_seed, np.arange(50), 0, (32, 32))
    )


def test_cifar_flip_rate_and_offsets_cover_their_range():
    p = view_params(CIFAR, np.arange(20000), 0, (32, 32))
    assert 0.48 < p[:, 4].mean() < 0.52
    for column in (0, 1):
        counts = np.bincount(p[:, column] + 4, minlength=9)
        assert len(counts) == 9 and counts.min() > 20000 / 9 * 0.9
    assert (p[:, 2:4] == 32).all()


def test_imagenet_boxes_fit_the_image_and_follow_scale_and_ratio():
    hw = np.array([[375, 500]] * 4000)
    p = view_params(IMAGENET, np.arange(4000), 0, hw)
    x0, y0, w, h = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 500).all() and (y0 + h <= 375).all()
    area = w * h / (375 * 500)
    assert area.min() > 0.07 and area.max() <= 1.0 and np.median(area) > 0.3
    assert 0.45 < p[:, 4].mean() < 0.55


def test_applying_stored_params_equals_an_independent_crop():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(16)]
    params, batch = render_views(CIFAR, images, np.arange(16), 0)
    assert np.array_equal(params, view_params(CIFAR, np.arange(16), 0, (32, 32)))
    for k, (image, (x0, y0, w, h, flip)) in enumerate(zip(images, params.tolist(), strict=True)):
        padded = torch.nn.functional.pad(torch.from_numpy(image).permute(2, 0, 1), (4, 4, 4, 4))
        expected = padded[:, y0 + 4 : y0 + 4 + h, x0 + 4 : x0 + 4 + w]
        assert torch.equal(batch[k], expected.flip(-1) if flip else expected)
    _, replayed = render_views(CIFAR, images, np.arange(16), 0, stored_params=params, source="cache")
    assert torch.equal(replayed, batch)  # deterministic
    with pytest.raises(ViewMismatchError, match="cache: sample 0 view 1"):
        render_views(CIFAR, images, np.arange(16), 1, stored_params=params, source="cache")


def test_imagenet_views_and_eval_transform_shapes():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), rng.integers(0, 255, (500, 260, 3), dtype=np.uint8)]
    params, views = render_views(IMAGENET, images, np.arange(2), 0)
    assert views.shape == (2, 3, 224, 224) and views.dtype == torch.uint8
    # The renderer equals torchvision's own crop, resize and flip of each image.
    from torchvision.transforms.v2 import functional as TF

    for k, (x0, y0, w, h, flip) in enumerate(params.tolist()):
        expected = TF.resized_crop(
            torch.from_numpy(images[k]).permute(2, 0, 1), y0, x0, h, w, [224, 224], antialias=True
        )
        assert torch.equal(views[k], expected.flip(-1) if flip else expected)
    assert eval_transform(IMAGENET, images).shape == (2, 3, 224, 224)
    assert torch.equal(
        eval_transform(CIFAR, [images[0][:32, :32]])[0], torch.from_numpy(images[0][:32, :32]).permute(2, 0, 1)
    )


def test_changed_spec_is_detected():
    ids = np.arange(64)
    stored = view_params(CIFAR, ids, 1, (32, 32))
    check_params(CIFAR, ids, 1, (32, 32), stored, "cache")
    changed = AugmentSpec("cifar", seed=3, size=32, pad=2)
    assert changed.fingerprint() != CIFAR.fingerprint()
    with pytest.raises(ViewMismatchError, match="cache: sample .* view 1: .*the augmentation spec changed"):
        check_params(changed, ids, 1, (32, 32), stored, "cache")


def test_spec_identity_holds_normalisation_and_renderer_version():
    d = IMAGENET.to_dict()
    assert (
        d["mean"] == [0.485, 0.456, 0.406]
        and d["std"] == [0.229, 0.224, 0.225]
        and d["renderer_version"] == RENDERER_VERSION
    )
    assert (d["renderer"], d["decoder"]) == ("cpu", "cpu")
    assert AugmentSpec.from_dict(d) == IMAGENET
    batch = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(
        normalize_batch(IMAGENET, batch)[0, :, 0, 0], (1 - torch.tensor(IMAGENET.mean)) / torch.tensor(IMAGENET.std)
    )


def test_cache_of_another_renderer_is_refused_with_a_clear_message():
    from pipeline.cache.identity import CacheIdentity, first_difference

    def identity(spec):
        return CacheIdentity("resnet8", "w", "f", "train", spec, 2, 2, 10)

    old = {k: v for k, v in CIFAR.to_dict().items() if k not in ("renderer_version", "mean", "std")}
    message = first_difference(identity(CIFAR.to_dict()), identity(old))
    assert message.startswith("spec.mean:")
    message = first_difference(identity(CIFAR.to_dict()), identity(CIFAR.to_dict() | {"renderer_version": 1}))
    assert "spec.renderer_version: the run needs 2, the cache holds 1" in message and "rebuild the cache" in message
