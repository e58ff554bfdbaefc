"""One short CPU training run of a student with CAT-KD against a fixed random teacher:
the loss goes down (plain SGD over the same loss code the trainer uses)."""

from __future__ import annotations

import numpy as np
import torch

from catkd.models import build_model
from pipeline.data.synthetic import make_arrays
from pipeline.data.views import AugmentSpec, normalize_batch, render_views
from pipeline.train.config import TrainConfig
from pipeline.train.step import live_targets, loss_terms


def test_catkd_loss_goes_down_against_fixed_random_teacher():
    torch.manual_seed(0)
    images, labels, _ = make_arrays(seed=3, start=0, count=128, size=32)
    spec = AugmentSpec.preset("cifar")
    cfg = TrainConfig(mode="online-catkd", data="-", teacher="resnet8", teacher_weights="-", beta=10.0)
    teacher = build_model("resnet8", 10, bias=True).eval()
    student = build_model("resnet8", 10)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    per_epoch = []
    for epoch in range(4):
        totals = []
        for first in range(0, 128, 32):
            ids = np.arange(first, first + 32)
            x = normalize_batch(spec, render_views(spec, list(images[ids]), ids, epoch)[1])
            t_cam, t_logits = live_targets(cfg, teacher, x)
            logits, cam = student(x)
            terms = loss_terms(cfg, logits, cam, torch.from_numpy(labels[ids]), t_cam, t_logits)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
            totals.append((float(terms["loss"]), float(terms["cat"])))
        per_epoch.append(np.mean(totals, axis=0))
    assert per_epoch[-1][1] < 0.5 * per_epoch[0][1]  # the CAT term
    assert per_epoch[-1][0] < per_epoch[0][0]  # the total
