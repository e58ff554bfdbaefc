"""Each loss and variant against an independent computation on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from catkd.losses import CATKDConfig, binarize_cam, cat_loss, catkd_loss, kd_loss, select_classes, teacher_cam_targets


def _np_pool(cam: np.ndarray, r: int) -> np.ndarray:
    """Average pooling to r x r for sides divisible by r (what adaptive pooling does then)."""
    n, c, h, w = cam.shape
    return cam.reshape(n, c, r, h // r, r, w // r).mean(axis=(3, 5))


def _np_cat(student: np.ndarray, teacher: np.ndarray, r: int, normalize: bool, mask=None) -> float:
    s, t = _np_pool(student, r).reshape(*student.shape[:2], -1), _np_pool(teacher, r).reshape(*teacher.shape[:2], -1)
    if normalize:
        s = s / np.maximum(np.linalg.norm(s, axis=2, keepdims=True), 1e-12)
        t = t / np.maximum(np.linalg.norm(t, axis=2, keepdims=True), 1e-12)
    sq = (s - t) ** 2
    if mask is None:
        return float(sq.mean())
    return float(sq[mask].mean())


@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("normalize", [False, True])
def test_cat_loss_matches_numpy(r, normalize):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 5, 8, 8)), rng.normal(size=(3, 5, 8, 8))
    got = cat_loss(torch.tensor(s), torch.tensor(t), resolution=r, normalize=normalize)
    assert math.isclose(float(got), _np_cat(s, t, r, normalize), rel_tol=1e-5)


def test_cat_loss_accepts_pooled_teacher_and_different_map_sizes():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 8, 8)
    pooled = torch.nn.functional.adaptive_avg_pool2d(teacher, 2)
    torch.testing.assert_close(cat_loss(student, pooled, 2), cat_loss(student, teacher, 2))


def test_cat_loss_normalize_all_zero_maps_is_finite():
    zeros = torch.zeros(2, 3, 4, 4)
    other = torch.randn(2, 3, 4, 4)
    assert float(cat_loss(zeros, zeros, 2, normalize=True)) == 0.0
    loss = cat_loss(zeros, other, 2, normalize=True)
    assert torch.isfinite(loss)
    # A zero map against a unit-norm map: each of the 4 cells contributes t^2, summing to 1 per map.
    assert math.isclose(float(loss), 1 / 4, rel_tol=1e-5)


def test_binarize_against_loop():
    torch.manual_seed(0)
    cam = torch.randn(2, 3, 4, 4)
    got = binarize_cam(cam)
    for n in range(2):
        for c in range(3):
            threshold = sum(abs(float(v)) for v in cam[n, c].flatten()) / 16
            expected = [[1.0 if float(cam[n, c, i, j]) > threshold else 0.0 for j in range(4)] for i in range(4)]
            assert got[n, c].tolist() == expected


def test_binarized_targets_are_binarized_before_pooling():
    cam = torch.zeros(1, 1, 4, 4)
    cam[0, 0, 0, 0] = 10.0  # one hot cell: mean |x| = 10/16, only that cell passes
    targets = teacher_cam_targets(cam, 2, binarize=True)
    assert targets.tolist() == [[[[0.25, 0.0], [0.0, 0.0]]]]


def test_select_classes_exactly_n_with_deterministic_ties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0]])
    assert select_classes(logits, 2, "top").tolist() == [[True, True, False, False], [False, True, True, False]]
    assert select_classes(logits, 1, "bottom").tolist() == [[False, False, False, True], [True, False, False, False]]
    assert select_classes(logits, 4, "top").all()
    ints = torch.randint(0, 3, (50, 10)).float()  # many ties
    for n in (1, 3, 10):
        assert (select_classes(ints, n, "top").sum(1) == n).all()
        assert (select_classes(ints, n, "bottom").sum(1) == n).all()


def test_select_classes_top_and_bottom_pick_extremes():
    logits = torch.tensor([[0.3, -1.0, 5.0, 2.0, 0.0]])
    assert select_classes(logits, 2, "top").nonzero()[:, 1].tolist() == [2, 3]
    assert select_classes(logits, 2, "bottom").nonzero()[:, 1].tolist() == [1, 4]


@pytest.mark.parametrize("n", [0, 6])
def test_select_classes_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be"):
        select_classes(torch.zeros(1, 5), n)


def test_masked_cat_loss_matches_numpy():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(4, 6, 4, 4)), rng.normal(size=(4, 6, 4, 4))
    logits = torch.tensor(rng.normal(size=(4, 6)))
    mask = select_classes(logits, 2, "top")
    got = cat_loss(torch.tensor(s), torch.tensor(t), 2, False, class_mask=mask)
    assert math.isclose(float(got), _np_cat(s, t, 2, False, mask.numpy()), rel_tol=1e-5)
    full = cat_loss(torch.tensor(s), torch.tensor(t), 2, False, class_mask=torch.ones(4, 6, dtype=torch.bool))
    assert math.isclose(float(full), _np_cat(s, t, 2, False), rel_tol=1e-6)


def test_kd_loss_matches_formula():
    torch.manual_seed(0)
    s, t, temp = torch.randn(5, 7), torch.randn(5, 7), 4.0
    p_t = torch.softmax(t / temp, 1)
    expected = (p_t * (torch.log(p_t) - torch.log_softmax(s / temp, 1))).sum(1).mean() * temp**2
    torch.testing.assert_close(kd_loss(s, t, temp), expected)
    assert float(kd_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


def test_catkd_loss_terms_and_cat_only_needs_no_labels():
    torch.manual_seed(0)
    logits, cam = torch.randn(4, 3), torch.randn(4, 3, 8, 8)
    targets = teacher_cam_targets(torch.randn(4, 3, 8, 8), 2)
    labels = torch.tensor([0, 1, 2, 0])
    cfg = CATKDConfig(ce_weight=1.0, beta=3.0)
    terms = catkd_loss(cfg, logits, cam, targets, labels=labels)
    expected = torch.nn.functional.cross_entropy(logits, labels) + 3.0 * cat_loss(cam, targets, 2)
    torch.testing.assert_close(terms["loss"], expected)
    cat_only = catkd_loss(CATKDConfig(ce_weight=0.0, beta=3.0), logits, cam, targets)
    assert set(cat_only) == {"loss", "cat"}
    with pytest.raises(ValueError, match="needs labels"):
        catkd_loss(cfg, logits, cam, targets)
    with pytest.raises(ValueError, match="teacher's logits"):
        catkd_loss(CATKDConfig(select_n=1), logits, cam, targets, labels=labels)


# ---------------------------------------------------------------- the logit methods (issue 41)
# Each against its paper's formula written out sample by sample (and class by class) in
# float64: values, and gradients with respect to the student's logits.


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def _reference_dkd(s, t, labels, alpha, beta, temp):
    """DKD (Zhao et al. 2022, eq. 7): TCKD on (p_target, 1 - p_target), NCKD on the
    non-target probabilities renormalised, p_j / (1 - p_target)."""
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        p_s, p_t = _softmax(s[i] / temp), _softmax(t[i] / temp)
        b_s = torch.stack([p_s[y], 1 - p_s[y]])
        b_t = torch.stack([p_t[y], 1 - p_t[y]])
        tckd = (b_t * (b_t.log() - b_s.log())).sum()
        others = [j for j in range(s.shape[1]) if j != y]
        q_s, q_t = p_s[others] / (1 - p_s[y]), p_t[others] / (1 - p_t[y])
        nckd = (q_t * (q_t.log() - q_s.log())).sum()
        total = total + alpha * tckd + beta * nckd
    return total / len(labels) * temp**2


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt())


def _reference_dist(s, t, beta, gamma, temp):
    """DIST (Huang et al. 2022, eqs. 5-8): 1 - Pearson correlation of the probabilities,
    per sample over classes (inter) and per class over the batch (intra), averaged."""
    y_s = torch.stack([_softmax(row / temp) for row in s])
    y_t = torch.stack([_softmax(row / temp) for row in t])
    inter = sum(1 - _pearson(y_s[i], y_t[i]) for i in range(len(s))) / len(s)
    intra = sum(1 - _pearson(y_s[:, c], y_t[:, c]) for c in range(s.shape[1])) / s.shape[1]
    return (beta * inter + gamma * intra) * temp**2


def _reference_standardize(z):
    mean = z.mean()
    std = ((z - mean).pow(2).sum() / (len(z) - 1)).sqrt()  # the unbiased std, as the paper's code
    return (z - mean) / (std + 1e-7)


def _value_and_grad(fn, s):
    s = s.clone().requires_grad_(True)
    value = fn(s)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_loss_matches_the_papers_formula(temp):
    from catkd.losses import dkd_loss

    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 7, generator=gen, dtype=torch.float64), 3 * torch.randn(6, 7, generator=gen).double()
    labels = torch.tensor([0, 3, 6, 2, 2, 5])
    got, got_grad = _value_and_grad(lambda x: dkd_loss(x, t, labels, 1.5, 8.0, temp).double(), s)
    want, want_grad = _value_and_grad(lambda x: _reference_dkd(x, t, labels, 1.5, 8.0, temp), s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)
    # the decomposition DKD starts from: KD = TCKD + (1 - p_target of the teacher) NCKD
    from catkd.losses import kd_loss

    one = labels[:1]
    p_t = torch.softmax(t[:1] / temp, 1)[0, one[0]]
    tckd, nckd = dkd_loss(s[:1], t[:1], one, 1.0, 0.0, temp), dkd_loss(s[:1], t[:1], one, 0.0, 1.0, temp)
    torch.testing.assert_close(
        kd_loss(s[:1], t[:1], temp).double(), (tckd + (1 - p_t) * nckd).double(), rtol=1e-5, atol=1e-7
    )


def test_dkd_warmup_rises_linearly_to_one():
    from catkd.losses import dkd_warmup_factor

    assert [dkd_warmup_factor(e, 4) for e in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert dkd_warmup_factor(1, 0) == 1.0


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dist_loss_matches_the_papers_formula(temp):
    from catkd.losses import dist_loss

    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 6, generator=gen).double(), 2 * torch.randn(5, 6, generator=gen).double()
    got, got_grad = _value_and_grad(lambda x: dist_loss(x, t, 2.0, 0.5, temp).double(), s)
    want, want_grad = _value_and_grad(lambda x: _reference_dist(x, t, 2.0, 0.5, temp), s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)
    assert float(dist_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_logit_standardisation_matches_the_papers_formula():
    from catkd.losses import standardize_logits

    gen = torch.Generator().manual_seed(2)
    s = torch.randn(4, 9, generator=gen).double() * 5 + 3
    t = torch.randn(4, 9, generator=gen).double() * 2 - 1
    got, got_grad = _value_and_grad(lambda x: kd_loss(standardize_logits(x), standardize_logits(t), 2.0).double(), s)
    want, want_grad = _value_and_grad(
        lambda x: kd_loss(
            torch.stack([_reference_standardize(r) for r in x]),
            torch.stack([_reference_standardize(r) for r in t]),
            2.0,
        ).double(),
        s,
    )
    assert float(want) > 0.01
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)
    # z-scores ignore a logit's shift and scale: a teacher 3x sharper is the same target
    z = standardize_logits(s)
    torch.testing.assert_close(standardize_logits(3 * s + 7), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.mean(1), torch.zeros(4, dtype=z.dtype), atol=1e-6, rtol=0)
