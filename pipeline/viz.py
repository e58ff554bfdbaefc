"""Pictures of CAMs: test images with each model's CAM for the true class overlaid."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from catkd.models import CAMClassifier


@torch.no_grad()
def true_class_cams(model: CAMClassifier, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) CAM of each sample's true class, upsampled to the input size, in [0, 1]."""
    model.eval()
    _, cam = model(inputs)
    cam = cam[torch.arange(len(labels)), labels].unsqueeze(1)
    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    low = cam.amin(dim=(1, 2), keepdim=True)
    high = cam.amax(dim=(1, 2), keepdim=True)
    return (cam - low) / (high - low).clamp_min(1e-8)


def peak_in_box_rate(cams: torch.Tensor, boxes: torch.Tensor) -> float:
    """Fraction of samples whose CAM maximum lies inside the object's box (x0, y0, x1, y1)."""
    n, _, w = cams.shape
    flat = cams.flatten(1).argmax(1)
    ys, xs = flat // w, flat % w
    inside = (xs >= boxes[:, 0]) & (xs < boxes[:, 2]) & (ys >= boxes[:, 1]) & (ys < boxes[:, 3])
    return float(inside.float().mean())


def save_cam_grid(
    path: str | Path,
    images: np.ndarray,
    cams_by_model: dict[str, torch.Tensor],
    class_names: list[str],
    labels: np.ndarray,
) -> None:
    """One row per image: the image, then each model's overlaid CAM."""
    rows, cols = len(images), 1 + len(cams_by_model)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.8 * rows), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(images[r])
        axes[r, 0].set_title(class_names[labels[r]], fontsize=7)
        for c, (name, cams) in enumerate(cams_by_model.items(), start=1):
            axes[r, c].imshow(images[r])
            axes[r, c].imshow(cams[r].numpy(), cmap="jet", alpha=0.45)
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
