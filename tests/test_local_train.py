"""A short CPU training run of a student with CAT-KD against a fixed random teacher."""

from __future__ import annotations

import torch

from catkd.losses import CATKDConfig
from catkd.models import build_model
from pipeline.local_train import LocalTrainConfig, evaluate, pad_crop_flip, train_local
from pipeline.synthetic import make_arrays


def test_catkd_loss_goes_down_against_fixed_random_teacher():
    torch.manual_seed(0)
    images, labels, _ = (torch.from_numpy(a) for a in make_arrays(seed=3, start=0, count=256, size=32))
    teacher = build_model("resnet8", 10, bias=True).eval()
    student = build_model("resnet8", 10)
    cfg = LocalTrainConfig(mode="catkd", epochs=4, batch_size=32, lr=0.05, catkd=CATKDConfig(ce_weight=1.0, beta=10.0))
    history = train_local(student, images, labels, cfg, teacher=teacher, log=lambda _: None)
    assert history[-1]["cat"] < 0.5 * history[0]["cat"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0.0 <= evaluate(student, images, labels) <= 100.0


def test_pad_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = pad_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        candidates = windows + [w.flip(2) for w in windows]
        assert any(torch.equal(out[n], w) for w in candidates)
