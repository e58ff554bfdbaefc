"""CAT-KD and the logit methods it is compared with (DESIGN section 1).

    loss = ce_weight * CE(student_logits, y) + beta * MSE(P(student_cam), P(teacher_cam))

``P`` is adaptive average pooling to r x r, optionally followed by L2 normalisation of
each class map over its r*r cells. The MSE is the mean over every element, as in the
reference implementation, so the paper's beta values carry over unchanged.

Teacher targets are prepared by ``teacher_cam_targets`` in exactly one way, whether the
teacher runs live or its targets come from the cache: that is what makes cached and
online CAT-KD agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Strategy = Literal["top", "bottom"]


def pool_cam(cam: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, r, r); a map already at r x r is returned as it is."""
    if cam.shape[-2:] == (resolution, resolution):
        return cam
    return F.adaptive_avg_pool2d(cam, resolution)


def binarize_cam(cam: torch.Tensor) -> torch.Tensor:
    """1 where a location exceeds the mean absolute value of its class map, else 0.

    Apply at full resolution, before pooling (the paper's binarised-CAM variant).
    """
    threshold = cam.abs().mean(dim=(-2, -1), keepdim=True)
    return (cam > threshold).to(cam.dtype)


def teacher_cam_targets(cam: torch.Tensor, resolution: int, *, binarize: bool = False) -> torch.Tensor:
    """What a teacher contributes to the CAT loss (and what the cache stores): (N, C, r, r)."""
    if binarize:
        cam = binarize_cam(cam)
    return pool_cam(cam.float(), resolution)


def select_classes(teacher_logits: torch.Tensor, n: int, strategy: Strategy = "top") -> torch.Tensor:
    """Boolean mask (N, C) keeping exactly ``n`` classes per sample.

    "top" keeps the n highest teacher logits, "bottom" the n lowest. Ties go to the
    lower class index (a stable sort), so the choice is deterministic.
    """
    num_classes = teacher_logits.shape[1]
    if not 1 <= n <= num_classes:
        raise ValueError(f"select_classes: n must be in 1..{num_classes}, got {n}")
    if strategy not in ("top", "bottom"):
        raise ValueError(f"select_classes: strategy must be 'top' or 'bottom', got {strategy!r}")
    order = torch.sort(teacher_logits, dim=1, descending=strategy == "top", stable=True).indices
    mask = torch.zeros_like(teacher_logits, dtype=torch.bool)
    return mask.scatter_(1, order[:, :n], True)


def cat_loss(
    student_cam: torch.Tensor,
    teacher_cam: torch.Tensor,
    resolution: int = 2,
    normalize: bool = False,
    class_mask: torch.Tensor | None = None,
    class_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class attention transfer: MSE between pooled (and optionally normalised) CAMs.

    ``teacher_cam`` may be full resolution or already pooled to r x r (cached targets).
    With ``class_mask`` (N, C) only the selected class maps count, and the mean is over
    their elements only. With ``class_index`` (N, K) the teacher holds only those K
    classes' maps (N, K, r, r), a top-k cache: the student's maps of the same classes
    are compared, which is the same loss as the mask of those classes over all C maps.
    """
    student = pool_cam(student_cam.float(), resolution).flatten(2)  # (N, C, r*r)
    teacher = pool_cam(teacher_cam.float(), resolution).flatten(2)
    if class_index is not None:
        student = student.gather(1, class_index[..., None].expand(-1, -1, student.shape[2]))
    if student.shape != teacher.shape:
        raise ValueError(
            f"cat_loss: student CAMs {tuple(student.shape)} and teacher CAMs {tuple(teacher.shape)} differ"
        )
    if normalize:
        # F.normalize divides by max(norm, eps): an all-zero map stays zero, never NaN.
        student = F.normalize(student, dim=2)
        teacher = F.normalize(teacher, dim=2)
    squared = (student - teacher).pow(2)
    if class_mask is None:
        return squared.mean()
    weights = class_mask.to(squared.dtype).unsqueeze(-1).expand_as(squared)
    return (squared * weights).sum() / weights.sum()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: KL(teacher || student) at temperature T, times T^2, mean over samples."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): each sample's logits as z-scores,
    (z - mean(z)) / (std(z) + eps) over the classes (the unbiased std, as the paper's
    code), so that the student matches the teacher's logit relations rather than their
    range; the KD temperature then acts as the paper's base temperature."""
    logits = logits.float()
    mean = logits.mean(dim=1, keepdim=True)
    return (logits - mean) / (logits.std(dim=1, keepdim=True) + eps)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): alpha TCKD + beta NCKD, each times T^2.

    TCKD is the KL divergence between the binary (target, every other class)
    probabilities of teacher and student; NCKD the KL divergence between their
    distributions over the non-target classes alone (the target's logit pushed out of
    the softmax). Both at temperature T, mean over samples; the warm-up of the loss
    weight is the caller's (``dkd_warmup_factor``)."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    target = F.one_hot(labels, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(t, dim=1)
    binary_s = torch.stack([(p_s * target).sum(1), (p_s * ~target).sum(1)], dim=1)
    binary_t = torch.stack([(p_t * target).sum(1), (p_t * ~target).sum(1)], dim=1)
    tckd = F.kl_div(binary_s.clamp_min(1e-12).log(), binary_t, reduction="batchmean")
    # non-target distributions: the target class masked out of both softmaxes
    masked_s = s.masked_fill(target, float("-inf"))
    masked_t = t.masked_fill(target, float("-inf"))
    log_q_s = F.log_softmax(masked_s, dim=1).masked_fill(target, 0.0)
    log_q_t = F.log_softmax(masked_t, dim=1).masked_fill(target, 0.0)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean()
    return (alpha * tckd + beta * nckd) * temperature**2


def dkd_warmup_factor(epoch: float, warmup_epochs: int) -> float:
    """DKD's linear warm-up of its loss weight: min(epoch / warmup, 1), with ``epoch``
    counted from 1 (the first epoch trains at 1 / warmup), as the DKD code does."""
    return 1.0 if warmup_epochs <= 0 else min(epoch / warmup_epochs, 1.0)


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - the Pearson correlation of each row of a with the same row of b, averaged."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (1 - F.cosine_similarity(a, b, dim=1, eps=eps)).mean()


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): beta inter-class + gamma intra-class relation
    loss, each times T^2. Inter-class: 1 - Pearson correlation between student and
    teacher probabilities over the classes of each sample; intra-class: the same over the
    samples of the batch for each class (so it depends on the batch, as the paper's)."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    inter = _pearson_distance(p_s, p_t)
    intra = _pearson_distance(p_s.t(), p_t.t())
    return (beta * inter + gamma * intra) * temperature**2


@dataclass
class CATKDConfig:
    """One configuration covers CAT-KD and its variants; CAT only is ``ce_weight=0``."""

    ce_weight: float = 1.0
    beta: float = 1.0  # the paper uses 0.7 to 400 depending on the pair; configs set it
    resolution: int = 2
    normalize: bool = False
    binarize: bool = False  # binarise teacher CAMs at full resolution before pooling
    select_n: int | None = None  # transfer only n classes' CAMs
    select_strategy: Strategy = "top"

    @property
    def needs_labels(self) -> bool:
        return self.ce_weight > 0


def catkd_loss(
    cfg: CATKDConfig,
    student_logits: torch.Tensor,
    student_cam: torch.Tensor,
    teacher_targets: torch.Tensor,
    labels: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_classes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Loss terms for one batch; ``teacher_targets`` come from ``teacher_cam_targets``,
    or from a top-k cache: the maps of the ``teacher_classes`` (N, K), highest teacher
    logit first, which transfers CAT over those K classes (``select_n`` <= K takes the
    first ``select_n``: the same as ``select_n`` with strategy top over all C maps).

    Returns {"loss", "cat", and "ce" when labels are used}.
    """
    mask = index = None
    if teacher_classes is not None:
        kept = teacher_classes.shape[1]
        n = kept if cfg.select_n is None else cfg.select_n
        if n > kept or cfg.select_strategy != "top":
            raise ValueError(
                f"the teacher targets hold the top {kept} classes; select_n={n} with strategy "
                f"{cfg.select_strategy!r} needs others"
            )
        index, teacher_targets = teacher_classes[:, :n], teacher_targets[:, :n]
    elif cfg.select_n is not None:
        if teacher_logits is None:
            raise ValueError("selecting classes needs the teacher's logits")
        mask = select_classes(teacher_logits, cfg.select_n, cfg.select_strategy)
    terms = {"cat": cat_loss(student_cam, teacher_targets, cfg.resolution, cfg.normalize, mask, index)}
    total = cfg.beta * terms["cat"]
    if cfg.needs_labels:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels; set ce_weight=0 for CAT only")
        terms["ce"] = F.cross_entropy(student_logits.float(), labels)
        total = total + cfg.ce_weight * terms["ce"]
    terms["loss"] = total
    return terms
