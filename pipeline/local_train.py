"""Single-process training on in-memory tensors: teachers (CE) and students (vanilla,
KD, CAT-KD, CAT only) with a live teacher.

This is the small, dependency-free loop behind ``catkd demo`` until the Ray pipeline
takes over; it uses the same loss functions the distributed trainer will.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from catkd.losses import CATKDConfig, catkd_loss, kd_loss, teacher_cam_targets
from catkd.models import CAMClassifier

Mode = Literal["ce", "kd", "catkd"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class LocalTrainConfig:
    mode: Mode = "ce"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    kd_temperature: float = 4.0
    catkd: CATKDConfig = field(default_factory=CATKDConfig)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, CIFAR mean/std."""
    x = images_uint8.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def pad_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """CIFAR augmentation for a whole batch: pad 4, random crop, random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def train_local(
    model: CAMClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: LocalTrainConfig,
    teacher: CAMClassifier | None = None,
    log: callable = print,
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns one dict of metrics per epoch."""
    if cfg.mode != "ce" and teacher is None:
        raise ValueError(f"mode {cfg.mode!r} needs a teacher")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    inputs = normalize(images)
    history = []
    if teacher is not None:
        teacher.eval()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        totals: dict[str, float] = {}
        steps, start = 0, time.perf_counter()
        for first in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            idx = order[first : first + cfg.batch_size]
            x = pad_crop_flip(inputs[idx], generator)
            y = labels[idx]
            logits, cam = model(x)
            terms = _loss_terms(cfg, logits, cam, y, x, teacher)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
            steps += 1
        sched.step()
        seconds = time.perf_counter() - start
        metrics = {k: v / steps for k, v in totals.items()}
        metrics.update(epoch=epoch + 1, images_per_s=steps * cfg.batch_size / seconds)
        history.append(metrics)
        log(f"  epoch {epoch + 1}/{cfg.epochs}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("epoch",)))
    return history


def _loss_terms(cfg: LocalTrainConfig, logits, cam, y, x, teacher) -> dict[str, torch.Tensor]:
    if cfg.mode == "ce":
        ce = F.cross_entropy(logits, y)
        return {"loss": ce, "ce": ce}
    with torch.no_grad():
        t_logits, t_cam = teacher(x)
    if cfg.mode == "kd":
        kd = kd_loss(logits, t_logits, cfg.kd_temperature)
        ce = F.cross_entropy(logits, y)
        return {"loss": ce + kd, "ce": ce, "kd": kd}
    targets = teacher_cam_targets(t_cam, cfg.catkd.resolution, binarize=cfg.catkd.binarize)
    return catkd_loss(cfg.catkd, logits, cam, targets, labels=y, teacher_logits=t_logits)


@torch.no_grad()
def evaluate(model: CAMClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    inputs = normalize(images)
    correct = 0
    for first in range(0, len(inputs), batch_size):
        logits, _ = model(inputs[first : first + batch_size])
        correct += int((logits.argmax(1) == labels[first : first + batch_size]).sum())
    return 100.0 * correct / len(inputs)
