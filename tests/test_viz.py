"""CAM pictures: the numbers behind them (true-class CAMs, predictions, peak-in-box)."""

from __future__ import annotations

import pytest
import torch

from catkd.models import build_model
from pipeline.viz import peak_in_box_rate, true_class_cams


def test_true_class_cams_are_scaled_per_image_and_batching_does_not_matter():
    torch.manual_seed(0)
    model = build_model("resnet8", 5)
    inputs, labels = torch.randn(7, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    cams, preds = true_class_cams(model, inputs, labels)
    chunked, chunked_preds = true_class_cams(model, inputs, labels, batch_size=3)
    assert cams.shape == (7, 32, 32)
    assert torch.allclose(cams.amin((1, 2)), torch.zeros(7)) and torch.allclose(cams.amax((1, 2)), torch.ones(7))
    assert torch.allclose(cams, chunked, atol=1e-5) and torch.equal(preds, chunked_preds)
    assert torch.equal(preds, model(inputs)[0].argmax(1))


def test_peak_in_box_rate_counts_peaks_inside_half_open_boxes():
    cams = torch.zeros(3, 8, 8)
    cams[0, 2, 3] = 1  # inside (x 3, y 2)
    cams[1, 5, 5] = 1  # x 5 is the box's exclusive right edge: outside
    cams[2, 0, 0] = 1  # outside
    boxes = torch.tensor([[1, 1, 5, 5], [1, 1, 5, 6], [1, 1, 5, 5]])
    assert peak_in_box_rate(cams, boxes) == pytest.approx(1 / 3)
