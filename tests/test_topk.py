"""The topk:K storage form without Ray: what it keeps, how it decodes, and that CAT from
it is CAT over the same K classes of a full cache (``select_n=K``, strategy top)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catkd.errors import ConfigError
from catkd.losses import CATKDConfig, catkd_loss
from pipeline.cache.identity import check_topk, parse_storage
from pipeline.cache.layout import decode_stored, encode_targets, raw_bytes_per_view


def _teacher(n=6, views=2, classes=10, r=2, seed=0):
    rng = np.random.default_rng(seed)
    cam = rng.normal(size=(n, views, classes, r, r)).astype(np.float32)
    logits = (3 * rng.normal(size=(n, views, classes))).astype(np.float32)
    return cam, logits


def _decode(arrays, view, classes):
    stored = {name: torch.from_numpy(np.ascontiguousarray(a[:, view])) for name, a in arrays.items()}
    return decode_stored(stored, None, classes)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_keeps_the_highest_classes_in_order_and_rebuilds_the_logits(k):
    cam, logits = _teacher()
    arrays = encode_targets(f"topk:{k}", cam, logits, None)
    assert arrays["classes"].dtype == np.int16 and arrays["classes"].shape == (6, 2, k)
    assert arrays["cam"].shape == (6, 2, k, 2, 2) and arrays["cam"].dtype == np.float16
    rounded = logits.astype(np.float16).astype(np.float32)
    t_cam, t_logits, t_classes = _decode(arrays, 1, 10)
    expected = torch.sort(torch.from_numpy(rounded[:, 1]), dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(t_classes, expected)
    np.testing.assert_allclose(
        t_cam.numpy(), np.take_along_axis(cam[:, 1], expected.numpy()[..., None, None], 1), rtol=1e-3, atol=1e-3
    )
    np.testing.assert_array_equal(
        np.take_along_axis(t_logits.numpy(), expected.numpy(), 1), np.sort(rounded[:, 1])[:, ::-1][:, :k]
    )
    if k < 10:
        # the leftover probability mass (temperature 1) is kept, spread evenly over the rest
        p_true = torch.softmax(torch.from_numpy(logits[:, 1]).double(), 1)
        p_rebuilt = torch.softmax(t_logits.double(), 1)
        kept = torch.zeros_like(p_true, dtype=torch.bool).scatter_(1, expected, True)
        torch.testing.assert_close(
            p_rebuilt[~kept].view(6, -1).sum(1), p_true[~kept].view(6, -1).sum(1), rtol=2e-2, atol=1e-3
        )
        rest = p_rebuilt[~kept].view(6, -1)
        torch.testing.assert_close(rest, rest[:, :1].expand_as(rest))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_cat_from_topk_equals_cat_over_the_same_classes_of_a_full_cache(k, normalize):
    cam, logits = _teacher(n=8, classes=10, seed=k)
    full = encode_targets("float16", cam, logits, None)
    topk = encode_targets(f"topk:{k}", cam, logits, None)
    f_cam, f_logits, _ = _decode(full, 0, 10)
    k_cam, k_logits, k_classes = _decode(topk, 0, 10)
    torch.manual_seed(0)
    student = torch.randn(8, 10, 4, 4, requires_grad=True)
    from_full = catkd_loss(
        CATKDConfig(beta=2.0, normalize=normalize, ce_weight=0, select_n=k),
        None,
        student,
        f_cam,
        teacher_logits=f_logits,
    )
    (grad_full,) = torch.autograd.grad(from_full["loss"], student)
    from_topk = catkd_loss(
        CATKDConfig(beta=2.0, normalize=normalize, ce_weight=0),
        None,
        student,
        k_cam,
        teacher_logits=k_logits,
        teacher_classes=k_classes,
    )
    (grad_topk,) = torch.autograd.grad(from_topk["loss"], student)
    torch.testing.assert_close(from_topk["cat"], from_full["cat"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_topk, grad_full, rtol=1e-5, atol=1e-8)
    # fewer classes than stored: the first ones, as select_n with strategy top over a full cache
    if k > 1:
        fewer_full = catkd_loss(
            CATKDConfig(ce_weight=0, select_n=k - 1, normalize=normalize), None, student, f_cam, teacher_logits=f_logits
        )
        fewer_topk = catkd_loss(
            CATKDConfig(ce_weight=0, select_n=k - 1, normalize=normalize),
            None,
            student,
            k_cam,
            teacher_logits=k_logits,
            teacher_classes=k_classes,
        )
        torch.testing.assert_close(fewer_topk["cat"], fewer_full["cat"], rtol=1e-6, atol=1e-7)


def test_topk_selection_beyond_what_is_stored_is_refused():
    cam, logits = _teacher()
    k_cam, k_logits, k_classes = _decode(encode_targets("topk:2", cam, logits, None), 0, 10)
    student = torch.randn(6, 10, 4, 4)
    with pytest.raises(ValueError, match="top 2 classes; select_n=3"):
        catkd_loss(
            CATKDConfig(ce_weight=0, select_n=3),
            None,
            student,
            k_cam,
            teacher_logits=k_logits,
            teacher_classes=k_classes,
        )
    with pytest.raises(ValueError, match="'bottom'"):
        catkd_loss(
            CATKDConfig(ce_weight=0, select_n=1, select_strategy="bottom"),
            None,
            student,
            k_cam,
            teacher_classes=k_classes,
        )


def test_storage_spellings_and_bounds():
    assert parse_storage("float16") == ("float16", None)
    assert parse_storage("topk:50") == ("topk", 50)
    for bad in ("topk:0", "topk:-3", "topk", "topk:x", "bfloat16"):
        with pytest.raises(ConfigError, match="storage"):
            parse_storage(bad)
    check_topk("topk:10", 10)
    with pytest.raises(ConfigError, match="topk:11 keeps 11 classes per view, but the data has only 10 classes"):
        check_topk("topk:11", 10)


def test_sizes_of_the_forms():
    # ImageNet-1k, r = 4: every class in float16 (2 B a cell, 2 B a logit) against the top 50
    assert raw_bytes_per_view("float16", 1000, 4) == 1000 * (32 + 2) + 20
    assert raw_bytes_per_view("topk:50", 1000, 4) == 50 * (2 + 32 + 2) + 2 + 20 <= 2048
    assert raw_bytes_per_view("topk:100", 21841, 4) <= 4096  # ImageNet-21k: int16 indices still fit
    assert raw_bytes_per_view("topk:10", 40000, 2) == 10 * (4 + 8 + 2) + 2 + 20  # int32 indices beyond 32,767


@pytest.mark.parametrize("mode", ["kd", "dkd", "dist"])
def test_logit_methods_from_topk_read_the_rebuilt_logits(mode):
    """kd, dkd and dist from a topk:K cache read the C logits rebuilt from the K kept ones
    (docs/training.md): a label outside the K reads the leftover logit like every other
    unkept class; at TCKD and T = 1 with the label kept, DKD's target term is exact; with
    K = C the cache serves them as a full one does."""
    from catkd.losses import dkd_loss
    from pipeline.train.config import TrainConfig
    from pipeline.train.step import loss_terms

    cam, logits = _teacher(n=8, classes=10, seed=3)
    _, rebuilt, classes = _decode(encode_targets("topk:3", cam, logits, None), 0, 10)
    kept = torch.zeros(8, 10, dtype=torch.bool).scatter_(1, classes, True)
    labels = classes[:, 0].clone()  # each sample's label kept (the teacher's top class) ...
    labels[:4] = torch.nonzero(~kept[:4])[::7][:4, 1]  # ... but the first four's outside the K
    assert not kept[torch.arange(4), labels[:4]].any() and kept[torch.arange(4, 8), labels[4:]].all()
    student = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(mode=mode, data="unused", cache="unused", kd_temperature=1.0, dkd_warmup=0)
    terms = loss_terms(cfg, student, None, labels, None, rebuilt)
    assert torch.isfinite(terms[mode]) and set(terms) == {"loss", "ce", mode}
    if mode == "dkd":
        # TCKD at T = 1 reads p(label): exact for a kept label (float16 logits aside)
        exact = torch.from_numpy(logits[:, 0]).float()
        tckd = [
            dkd_loss(student[i : i + 1], t[i : i + 1], labels[i : i + 1], 1.0, 0.0, 1.0)
            for t in (rebuilt, exact)
            for i in (5,)
        ]
        torch.testing.assert_close(tckd[0], tckd[1], rtol=2e-2, atol=1e-3)
    # K = C: the same logits as the float16 form, so the same loss
    _, all_kept, _ = _decode(encode_targets("topk:10", cam, logits, None), 0, 10)
    _, dense, _ = _decode(encode_targets("float16", cam, logits, None), 0, 10)
    torch.testing.assert_close(
        loss_terms(cfg, student, None, labels, None, all_kept)[mode],
        loss_terms(cfg, student, None, labels, None, dense)[mode],
    )
