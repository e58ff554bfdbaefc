"""Loss terms of one training step for every mode; the same code for cached and live
teacher targets (the parity tests call it directly)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from catkd.losses import (
    CATKDConfig,
    catkd_loss,
    dist_loss,
    dkd_loss,
    dkd_warmup_factor,
    kd_loss,
    standardize_logits,
    teacher_cam_targets,
)
from catkd.models import CAMClassifier
from pipeline.cache.layout import decode_stored
from pipeline.train.config import LOGIT_METHODS, TrainConfig


def catkd_config(cfg: TrainConfig) -> CATKDConfig:
    """The loss settings of a run: TrainConfig carries every CATKDConfig field by name."""
    return CATKDConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(CATKDConfig)})


def live_targets(cfg: TrainConfig, teacher: CAMClassifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled CAM targets, logits) of a live teacher: the same function the cache uses."""
    with torch.no_grad():
        logits, cam = teacher(x)
    return teacher_cam_targets(cam.float(), cfg.resolution, binarize=cfg.binarize), logits.float()


def cached_targets(
    batch: dict[str, torch.Tensor],
    device: torch.device,
    head_weight: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(t_cam, t_logits, t_classes) on ``device``, decoded there from the stored form the
    loader sends (``t_``-prefixed arrays of the cache's form); t_classes is None except
    for a top-k cache (``layout.decode_stored``)."""
    if "t_logits" not in batch:
        return None, None, None
    stored = {name[2:]: a.to(device, non_blocking=True) for name, a in batch.items() if name.startswith("t_")}
    return decode_stored(stored, head_weight, num_classes)


def loss_terms(
    cfg: TrainConfig,
    logits: torch.Tensor,
    cam: torch.Tensor,
    labels: torch.Tensor,
    t_cam: torch.Tensor | None = None,
    t_logits: torch.Tensor | None = None,
    t_classes: torch.Tensor | None = None,
    epoch: int = 0,
    hard_labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """{"loss", and each term}; ``t_cam``/``t_logits``/``t_classes`` from the cache or
    ``live_targets``. The logit methods read the C logits (a top-k cache's rebuilt ones:
    docs/training.md says what each then reads exactly). ``labels`` are what
    cross-entropy reads (soft under mixing); DKD's target class is ``hard_labels`` (the
    sample's own label under mixing), else ``labels``. ``epoch`` (0-based) drives DKD's
    warm-up."""
    method = cfg.method
    if method == "ce":
        ce = F.cross_entropy(logits.float(), labels)
        return {"loss": ce, "ce": ce}
    if method in LOGIT_METHODS:
        ce = F.cross_entropy(logits.float(), labels)
        student, teacher = logits, t_logits
        if cfg.logit_std:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        T = cfg.kd_temperature
        if method == "kd":
            term, weight = kd_loss(student, teacher, T), cfg.kd_weight
        elif method == "dkd":
            target = hard_labels if hard_labels is not None else labels
            term = dkd_loss(student, teacher, target, cfg.dkd_alpha, cfg.dkd_beta, T)
            weight = dkd_warmup_factor(epoch + 1, cfg.dkd_warmup)
        else:
            term, weight = dist_loss(student, teacher, cfg.dist_beta, cfg.dist_gamma, T), 1.0
        return {"loss": cfg.ce_weight * ce + weight * term, "ce": ce, method: term}
    return catkd_loss(
        catkd_config(cfg),
        logits,
        cam,
        t_cam,
        labels=labels if cfg.ce_weight > 0 else None,
        teacher_logits=t_logits,
        teacher_classes=t_classes,
    )
